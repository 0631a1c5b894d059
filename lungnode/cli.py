"""The `lungnode` console command."""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys


def _cmd_config(args: argparse.Namespace) -> int:
    from lungnode.config import dump_yaml, get_settings

    sys.stdout.write(dump_yaml(get_settings()))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lungnode.accounts import FIRST_ADMIN, Accounts
    from lungnode.api import create_app
    from lungnode.audit import AuditTrail
    from lungnode.config import get_settings
    from lungnode.node import Node

    settings = get_settings()
    if (settings.tls_cert is None) != (settings.tls_key is None):
        sys.exit("lungnode serve: HTTPS needs both LUNGNODE_TLS_CERT and LUNGNODE_TLS_KEY")
    accounts = Accounts(settings.accounts_path)
    audit = AuditTrail.from_settings(settings)
    first_password = accounts.create_first_admin(settings.admin_password)
    if first_password:
        audit.account_changed("lungnode serve", socket.gethostname(), FIRST_ADMIN, "first admin created")
        if not settings.admin_password:  # shown once, here: only its hash is kept
            print(f"\nNo user existed: created the admin account '{FIRST_ADMIN}' with the password\n\n"
                  f"    {first_password}\n\nLog in and keep it safe; it is not shown again "
                  f"(`lungnode users passwd {FIRST_ADMIN}` sets another).\n", flush=True)
    node = Node(settings, on_association=audit.dicom_association, on_verified=audit.verified_results)
    node.start()
    audit.application(started=True)
    scheme = "https" if settings.tls_cert else "http"
    logging.getLogger("lungnode").info(
        "lungnode ready: DICOM %s on port %d, web on %s://%s:%d, results to %s",
        settings.ae_title, settings.dicom_port, scheme, settings.http_host, settings.http_port,
        settings.pacs or "(no PACS configured: set LUNGNODE_PACS)")
    # uvicorn re-raises the SIGTERM it shut down on: as SystemExit, so the node stops and the audit
    # trail records it and sends what it holds.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        # TLS 1.2 is the least Python's server context accepts (the default since Python 3.10).
        uvicorn.run(create_app(node, accounts, audit), host=settings.http_host, port=settings.http_port,
                    log_level="warning", ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key)
    finally:
        node.stop()
        audit.application(started=False)
        audit.close()
        accounts.close()
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``command`` given, the `train` commands (whose modules load PyTorch)
    only when it is "train", so `lungnode --help` and `lungnode models ...` start fast."""
    parser = argparse.ArgumentParser(prog="lungnode", description="AI lung-nodule detection beside the PACS.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the DICOM node (SCP, processing, delivery) and its web API")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("config", help="print the effective settings (YAML + environment)")
    p.set_defaults(func=_cmd_config)

    from lungnode.models.cli import register as register_models
    from lungnode.training.cli import TRAIN_HELP, register as register_train
    from lungnode.users_cli import register as register_users

    register_users(sub)
    if command in (None, "train"):
        register_train(sub)
    else:
        sub.add_parser("train", help=TRAIN_HELP)  # listed in the help; its commands load with `lungnode train`
    register_models(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), "")  # the top-level options take no value
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
