"""`lungnode users`: the accounts of the page and API (add, list, passwd, token). Each change goes to the
audit trail, with the operating-system user who made it."""
from __future__ import annotations

import argparse
import getpass
import socket
import sys
from datetime import datetime, timezone

from lungnode.accounts import ROLES, AccountError, Accounts
from lungnode.audit import AuditTrail
from lungnode.config import Settings, get_settings


def read_password(prompt: str) -> str:
    """Asked twice on a terminal; else the first line of standard input (for scripts)."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass(prompt)
    if getpass.getpass("again: ") != first:
        raise AccountError("the two passwords differ")
    return first


def _audited(settings: Settings, account: str, change: str) -> None:
    audit = AuditTrail.from_settings(settings)
    try:
        audit.account_changed(getpass.getuser(), socket.gethostname(), account, change)
    finally:
        audit.close()


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _run(args: argparse.Namespace) -> int:
    settings = get_settings()
    accounts = Accounts(settings.accounts_path)
    try:
        if args.users_command == "list":
            for u in accounts.users():
                print(f"user   {u.name:<24} {u.role:<12} since {_when(u.created)}")
            for t in accounts.tokens():
                print(f"token  {t.name:<24} {t.role:<12} since {_when(t.created)}")
        elif args.users_command == "add":
            accounts.add_user(args.name, args.role, read_password(f"password for {args.name}: "))
            _audited(settings, args.name, f"user added, role {args.role}")
        elif args.users_command == "passwd":
            accounts.set_password(args.name, read_password(f"new password for {args.name}: "))
            _audited(settings, args.name, "password changed")
        elif args.revoke:
            if not accounts.revoke_token(args.name):
                raise AccountError(f"no token {args.name!r}")
            _audited(settings, args.name, "API token revoked")
        else:
            token = accounts.create_token(args.name, args.role)
            _audited(settings, args.name, f"API token created, role {args.role}")
            print(token)
            print(f"API token for {args.name} ({args.role}); it is shown only now. Send it as "
                  "'Authorization: Bearer <token>'.", file=sys.stderr)
    except AccountError as exc:
        print(f"lungnode users: {exc}", file=sys.stderr)
        return 1
    finally:
        accounts.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("users", help="accounts of the web page and API: add, list, passwd, token")
    p.set_defaults(func=_run)
    users = p.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    users.add_parser("list", help="users and API tokens with their roles")
    add = users.add_parser("add", help="a new user (password asked, or the first line of standard input)")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, required=True)
    passwd = users.add_parser("passwd", help="a new password for a user (ends their open sessions)")
    passwd.add_argument("name")
    token = users.add_parser("token", help="a new API token for a machine, printed once (replaces its old one)")
    token.add_argument("name")
    group = token.add_mutually_exclusive_group(required=True)
    group.add_argument("--role", choices=ROLES)
    group.add_argument("--revoke", action="store_true", help="delete the token instead")
