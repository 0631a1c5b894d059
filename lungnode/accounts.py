"""Who may use the page and the API: users with a role and an Argon2id password hash, API tokens for
machines (stored as SHA-256 digests, shown once), and login sessions (server side, so logout ends them).

All three live in their own SQLite file, `accounts.sqlite3` beside the job database: credentials can
then be kept with tighter permissions (0600), backed up and wiped apart from the patient data, and the
receive path's many small writes never wait on a login."""
from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# viewer: reads the worklist, studies and images; radiologist: also records feedback on the findings;
# admin: also re-runs and re-sends.
Role = Literal["viewer", "radiologist", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)
VIEWER, RADIOLOGIST, ADMIN = ROLES
FIRST_ADMIN = "admin"
MIN_PASSWORD_LENGTH = 12
TOKEN_PREFIX = "lnt_"
EXTERNAL = "!external"  # the password hash of a user the identity provider signs in: no password matches it
_NAME_RE = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, password_hash TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS api_tokens (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, token_sha256 TEXT NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id_sha256 TEXT PRIMARY KEY, user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    csrf TEXT NOT NULL, expires REAL NOT NULL);
"""


class AccountError(ValueError):
    """A request the account store refuses (unknown user, bad role or name, short password)."""


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    created: float


@dataclass(frozen=True)
class ApiToken:
    name: str
    role: Role
    created: float


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a logged-in user (with the session's CSRF token) or an API token."""

    name: str
    role: Role
    csrf: str | None = None  # None for a bearer token: no cookie, so nothing a browser sends by itself

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    @property
    def can_review(self) -> bool:
        """May confirm, reject and add findings (radiologists and admins)."""
        return self.role in (RADIOLOGIST, ADMIN)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise AccountError(f"a name is 1-64 letters, digits or . _ @ -, got {name!r}")
    return name


def check_role(role: str) -> Role:
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return role  # type: ignore[return-value]


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"a password has at least {MIN_PASSWORD_LENGTH} characters")
    return password


class Accounts:
    """The account store; thread-safe (one connection, serialised by a lock), shared by the server and
    the `lungnode users` command (SQLite WAL lets both use the file at once)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        self._hasher = PasswordHasher()
        self._dummy_hash = self._hasher.hash(secrets.token_hex(16))  # unknown users cost a verify too
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def _query(self, sql: str, *args) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # --- users -----------------------------------------------------------------------------------
    def users(self) -> list[User]:
        return [User(*row) for row in self._query("SELECT name, role, created FROM users ORDER BY name")]

    def add_user(self, name: str, role: str, password: str) -> User:
        user = User(check_name(name), check_role(role), time.time())
        try:
            self._query("INSERT INTO users VALUES (?, ?, ?, ?)", user.name, user.role,
                        self._hasher.hash(check_password(password)), user.created)
        except sqlite3.IntegrityError as exc:
            raise AccountError(f"user {name!r} exists already") from exc
        return user

    def set_password(self, name: str, password: str) -> None:
        """A new password; the user's open sessions end."""
        new_hash = self._hasher.hash(check_password(password))
        with self._lock:
            if not self._conn.execute("UPDATE users SET password_hash = ? WHERE name = ?", (new_hash, name)).rowcount:
                raise AccountError(f"no user {name!r}")
            self._conn.execute("DELETE FROM sessions WHERE user = ?", (name,))

    def authenticate(self, name: str, password: str) -> User | None:
        """The user when the password is right, else None (an unknown name takes as long as a known one)."""
        rows = self._query("SELECT name, role, created, password_hash FROM users WHERE name = ?", name)
        stored = rows[0][3] if rows else self._dummy_hash
        try:
            self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return None
        if not rows:
            return None
        if self._hasher.check_needs_rehash(stored):  # the library's parameters moved on: upgrade the hash
            self._query("UPDATE users SET password_hash = ? WHERE name = ?", self._hasher.hash(password), name)
        return User(*rows[0][:3])

    def external_user(self, name: str, role: str) -> User:
        """A user signed in by the hospital's identity provider, with the role it gives now. Such a user has
        no password here; a local account of the same name is not taken over."""
        user = User(check_name(name), check_role(role), time.time())
        with self._lock:
            row = self._conn.execute("SELECT password_hash FROM users WHERE name = ?", (name,)).fetchone()
            if row and row[0] != EXTERNAL:
                raise AccountError(f"{name!r} is a local account")
            self._conn.execute("INSERT INTO users VALUES (?, ?, ?, ?) "
                               "ON CONFLICT(name) DO UPDATE SET role = excluded.role",
                               (user.name, user.role, EXTERNAL, user.created))
        return user

    def create_first_admin(self, password: str | None) -> str | None:
        """When no user exists: the account `admin` with the given password, else a random one. Returns
        the password it was made with, or None when there were users already."""
        if self._query("SELECT 1 FROM users LIMIT 1"):
            return None
        chosen = password or secrets.token_urlsafe(18)
        self.add_user(FIRST_ADMIN, ADMIN, chosen)
        return chosen

    # --- API tokens ------------------------------------------------------------------------------
    def tokens(self) -> list[ApiToken]:
        return [ApiToken(*row) for row in self._query("SELECT name, role, created FROM api_tokens ORDER BY name")]

    def create_token(self, name: str, role: str) -> str:
        """A new bearer token for a machine; replaces the name's previous token. Only its digest is kept."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        self._query("INSERT OR REPLACE INTO api_tokens VALUES (?, ?, ?, ?)", check_name(name), check_role(role),
                    _digest(token), time.time())
        return token

    def revoke_token(self, name: str) -> bool:
        return bool(self._query("DELETE FROM api_tokens WHERE name = ? RETURNING name", name))

    def principal_for_token(self, token: str) -> Principal | None:
        rows = self._query("SELECT name, role FROM api_tokens WHERE token_sha256 = ?", _digest(token))
        return Principal(*rows[0]) if rows else None

    # --- login sessions --------------------------------------------------------------------------
    def open_session(self, user: User, minutes: float) -> str:
        """A new session for the user; returns its id for the cookie (only its digest is stored)."""
        session_id, now = secrets.token_urlsafe(32), time.time()
        with self._lock:
            self._conn.execute("DELETE FROM sessions WHERE expires < ?", (now,))
            self._conn.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)",
                               (_digest(session_id), user.name, secrets.token_urlsafe(32), now + minutes * 60))
        return session_id

    def principal_for_session(self, session_id: str) -> Principal | None:
        rows = self._query("SELECT u.name, u.role, s.csrf FROM sessions s JOIN users u ON u.name = s.user "
                           "WHERE s.id_sha256 = ? AND s.expires > ?", _digest(session_id), time.time())
        return Principal(*rows[0]) if rows else None

    def close_session(self, session_id: str) -> None:
        self._query("DELETE FROM sessions WHERE id_sha256 = ?", _digest(session_id))
