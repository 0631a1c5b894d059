"""UIDs that name things on disk, checked before they do.

A Study, Series or SOP Instance UID comes from the sender's header and names a folder or a file here;
one that is really a path (`..`, `/tmp/x`, `../../x`) must never reach the file system. The rule is the
UI value representation (PS3.5 6.2, 9.1): components of digits separated by single dots, at most 64
characters. Leading zeros in a component break PS3.5 9.1 but are seen in real archives and are harmless
as a path part, so they are let through; nothing else is.
"""
from __future__ import annotations

import re
from pathlib import Path

MAX_UID_LENGTH = 64
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


class InvalidUID(ValueError):
    """A value that cannot be a UID, with what it was and why (short enough for an Error Comment)."""


def uid_problem(value: str) -> str | None:
    """Why ``value`` is not a UID, or None when it is one."""
    if not value:
        return "empty"
    if len(value) > MAX_UID_LENGTH:
        return f"{len(value)} characters, more than {MAX_UID_LENGTH}"
    if not _UID.fullmatch(value):
        return "not digits and single dots"
    return None


def checked_uid(name: str, value: object) -> str:
    """``value`` as a UID string (trailing NUL/space padding removed), or InvalidUID naming ``name``."""
    text = str(value if value is not None else "").rstrip("\0 ")
    problem = uid_problem(text)
    if problem:
        raise InvalidUID(f"{name} {text[:20]!r}: not a UID ({problem})")
    return text


def inside(root: Path, path: Path) -> Path:
    """``path`` when it lies under ``root`` once both are resolved, else ValueError: the last guard
    before anything is written, moved or deleted."""
    resolved_root, resolved = root.resolve(), path.resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise ValueError(f"{path} is outside {root}")
    return path
