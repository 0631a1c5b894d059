"""The account store: Argon2id password hashes, API tokens kept only as digests, sessions that expire
and end with a new password, and the first admin made once."""
from __future__ import annotations

import hashlib

import pytest

from lungnode.accounts import ADMIN, FIRST_ADMIN, RADIOLOGIST, AccountError, Accounts

PASSWORD = "correct horse battery"


@pytest.fixture
def accounts(tmp_path):
    store = Accounts(tmp_path / "accounts.sqlite3")
    yield store
    store.close()


def test_passwords_are_stored_as_argon2id_hashes_and_checked(accounts, tmp_path):
    accounts.add_user("dr.lan", RADIOLOGIST, PASSWORD)
    raw = (tmp_path / "accounts.sqlite3").read_bytes() + (tmp_path / "accounts.sqlite3-wal").read_bytes()
    assert PASSWORD.encode() not in raw and b"$argon2id$" in raw
    assert (tmp_path / "accounts.sqlite3").stat().st_mode & 0o077 == 0, "only the node's user may read it"
    assert accounts.authenticate("dr.lan", PASSWORD).role == RADIOLOGIST
    assert accounts.authenticate("dr.lan", PASSWORD + "x") is None
    assert accounts.authenticate("nobody", PASSWORD) is None


@pytest.mark.parametrize("name, role, password, message", [
    ("dr lan", RADIOLOGIST, PASSWORD, "a name is"), ("dr.lan", "superuser", PASSWORD, "role must be"),
    ("dr.lan", RADIOLOGIST, "short", "at least 12")])
def test_bad_names_roles_and_short_passwords_are_refused(accounts, name, role, password, message):
    with pytest.raises(AccountError, match=message):
        accounts.add_user(name, role, password)
    assert accounts.users() == []


def test_a_user_name_is_taken_once(accounts):
    accounts.add_user("dr.lan", RADIOLOGIST, PASSWORD)
    with pytest.raises(AccountError, match="exists"):
        accounts.add_user("dr.lan", ADMIN, PASSWORD)


def test_a_new_password_ends_open_sessions(accounts):
    user = accounts.add_user("dr.lan", RADIOLOGIST, PASSWORD)
    session = accounts.open_session(user, minutes=60)
    assert accounts.principal_for_session(session).name == "dr.lan"
    accounts.set_password("dr.lan", "another good password")
    assert accounts.principal_for_session(session) is None
    assert accounts.authenticate("dr.lan", PASSWORD) is None
    assert accounts.authenticate("dr.lan", "another good password") is not None


def test_sessions_expire_end_at_logout_and_each_has_its_own_csrf_token(accounts):
    user = accounts.add_user("dr.lan", RADIOLOGIST, PASSWORD)
    expired = accounts.open_session(user, minutes=-1)
    assert accounts.principal_for_session(expired) is None
    first, second = accounts.open_session(user, minutes=60), accounts.open_session(user, minutes=60)
    assert accounts.principal_for_session(first).csrf != accounts.principal_for_session(second).csrf
    accounts.close_session(first)
    assert accounts.principal_for_session(first) is None and accounts.principal_for_session(second) is not None


def test_api_tokens_are_kept_as_digests_replaced_and_revoked(accounts, tmp_path):
    token = accounts.create_token("pacs-robot", RADIOLOGIST)
    raw = (tmp_path / "accounts.sqlite3").read_bytes() + (tmp_path / "accounts.sqlite3-wal").read_bytes()
    assert token.encode() not in raw and hashlib.sha256(token.encode()).hexdigest().encode() in raw
    who = accounts.principal_for_token(token)
    assert (who.name, who.role, who.csrf) == ("pacs-robot", RADIOLOGIST, None)
    newer = accounts.create_token("pacs-robot", ADMIN)
    assert accounts.principal_for_token(token) is None and accounts.principal_for_token(newer).is_admin
    assert accounts.revoke_token("pacs-robot") and accounts.principal_for_token(newer) is None
    assert not accounts.revoke_token("pacs-robot")


def test_the_first_admin_is_made_once(accounts):
    password = accounts.create_first_admin(None)
    assert len(password) >= 20 and accounts.authenticate(FIRST_ADMIN, password).role == ADMIN
    assert accounts.create_first_admin(None) is None and accounts.create_first_admin("given password 1") is None
    assert [u.name for u in accounts.users()] == [FIRST_ADMIN]


def test_users_of_the_identity_provider_have_no_password_here_and_take_over_no_local_account(accounts):
    accounts.add_user("dr.lan", RADIOLOGIST, PASSWORD)
    with pytest.raises(AccountError, match="local account"):
        accounts.external_user("dr.lan", ADMIN)
    assert accounts.authenticate("dr.lan", PASSWORD).role == RADIOLOGIST
    assert accounts.external_user("dr.binh", RADIOLOGIST).role == RADIOLOGIST
    assert accounts.external_user("dr.binh", ADMIN).role == ADMIN  # the provider's word at each sign-in
    assert [(u.name, u.role) for u in accounts.users()] == [("dr.binh", ADMIN), ("dr.lan", RADIOLOGIST)]
    assert accounts.authenticate("dr.binh", "") is None and accounts.authenticate("dr.binh", "!external") is None
