"""Sign-in with the hospital's OpenID Connect provider: the authorization code flow with PKCE (authlib's
OAuth 2 client for the exchange), the ID token's signature, issuer, audience, expiry and nonce checked
(joserfc) against the provider's published keys. The role comes from a claim of the ID token
(`oidc_roles_claim`, holding `oidc_admin_group` or `oidc_radiologist_group`); a user with neither is
refused. The user then has an ordinary lungnode session, and the sign-in is audited like a password login.

The flow's state is kept on the server for `FLOW_SECONDS` and bound to the browser that started it by a
SameSite=Lax cookie (the provider's redirect back is a cross-site navigation, which a Strict cookie would
miss); for the same reason the callback answers with a page that moves on by itself, so the Strict
session cookie is sent on the next request."""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from html import escape
from urllib.parse import quote

import requests
from authlib.integrations.requests_client import OAuth2Session
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from starlette.concurrency import run_in_threadpool

from lungnode.accounts import ADMIN, RADIOLOGIST, AccountError, Accounts, Role
from lungnode.audit import AuditTrail
from lungnode.config import Settings
from lungnode.web.login import safe_next, start_session
from lungnode.web.security import client_ip

FLOW_COOKIE = "lungnode_oidc"
FLOW_SECONDS = 600.0
START_PATH, CALLBACK_PATH = "/login/oidc", "/login/oidc/callback"


class OidcError(Exception):
    """The sign-in was refused; the message says why (for the audit trail and the user)."""


@dataclass(frozen=True)
class Flow:
    state: str
    nonce: str
    verifier: str
    target: str
    started: float


class OidcClient:
    def __init__(self, issuer: str, client_id: str, client_secret: str | None, roles_claim: str,
                 groups: dict[str, Role], timeout: float = 10.0) -> None:
        self.issuer = issuer.rstrip("/")
        self.client_id, self.client_secret = client_id, client_secret
        self.roles_claim, self.groups = roles_claim, groups
        self.timeout = timeout
        self._metadata: dict | None = None

    @classmethod
    def from_settings(cls, s: Settings) -> "OidcClient | None":
        if not s.oidc_issuer:
            return None
        if not s.oidc_client_id:
            raise ValueError("LUNGNODE_OIDC_ISSUER needs LUNGNODE_OIDC_CLIENT_ID")
        return cls(s.oidc_issuer, s.oidc_client_id, s.oidc_client_secret, s.oidc_roles_claim,
                   {s.oidc_admin_group: ADMIN, s.oidc_radiologist_group: RADIOLOGIST})

    def metadata(self) -> dict:
        """The provider's discovery document, fetched on first use (the provider may start after us)."""
        if self._metadata is None:
            r = requests.get(f"{self.issuer}/.well-known/openid-configuration", timeout=self.timeout)
            r.raise_for_status()
            self._metadata = r.json()
        return self._metadata

    def _session(self, redirect_uri: str) -> OAuth2Session:
        return OAuth2Session(self.client_id, self.client_secret, scope="openid profile", redirect_uri=redirect_uri,
                             code_challenge_method="S256")

    def authorization_url(self, redirect_uri: str, flow: Flow) -> str:
        url, _ = self._session(redirect_uri).create_authorization_url(
            self.metadata()["authorization_endpoint"], state=flow.state, nonce=flow.nonce, code_verifier=flow.verifier)
        return url

    def identity(self, code: str, redirect_uri: str, flow: Flow) -> tuple[str, Role]:
        """Exchange the code, check the ID token, and return the user name and role it gives."""
        meta = self.metadata()
        try:
            with self._session(redirect_uri) as oauth:
                token = oauth.fetch_token(meta["token_endpoint"], code=code, code_verifier=flow.verifier,
                                          timeout=self.timeout)
            keys = KeySet.import_key_set(requests.get(meta["jwks_uri"], timeout=self.timeout).json())
            claims = jwt.decode(token["id_token"], keys).claims
            jwt.JWTClaimsRegistry(iss={"essential": True, "value": meta.get("issuer", self.issuer)},
                                  aud={"essential": True, "value": self.client_id},
                                  nonce={"essential": True, "value": flow.nonce},
                                  exp={"essential": True}, sub={"essential": True}).validate(claims)
        except (JoseError, KeyError, ValueError, requests.RequestException) as exc:
            raise OidcError(f"the provider's answer was not accepted: {type(exc).__name__}: {exc}") from exc
        name = str(claims.get("preferred_username") or claims["sub"])
        granted = claims.get(self.roles_claim) or []
        roles = {self.groups[g] for g in (granted if isinstance(granted, list) else [granted]) if g in self.groups}
        if not roles:
            raise OidcError(f"{name} is in neither lungnode group ({', '.join(self.groups)})")
        return name, ADMIN if ADMIN in roles else RADIOLOGIST


class Flows:
    """Sign-ins under way, by state, forgotten after FLOW_SECONDS."""

    def __init__(self) -> None:
        self._flows: dict[str, Flow] = {}
        self._lock = threading.Lock()

    def start(self, target: str) -> Flow:
        flow = Flow(secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(48), target,
                    time.monotonic())
        with self._lock:
            now = time.monotonic()
            self._flows = {k: f for k, f in self._flows.items() if now - f.started < FLOW_SECONDS}
            self._flows[flow.state] = flow
        return flow

    def finish(self, state: str) -> Flow | None:
        with self._lock:
            flow = self._flows.pop(state, None)
        return flow if flow and time.monotonic() - flow.started < FLOW_SECONDS else None


def _moving_on(target: str) -> HTMLResponse:
    """A page that goes to `target` by itself: a same-site navigation, so the session cookie goes with it."""
    url = escape(target, quote=True)
    return HTMLResponse(f'<!doctype html><meta http-equiv="refresh" content="0;url={url}"><a href="{url}">lungnode</a>')


def add_oidc(app: FastAPI, client: OidcClient, accounts: Accounts, audit: AuditTrail, session_minutes: float) -> None:
    flows = Flows()

    def callback_url(request: Request) -> str:
        return f"{request.url.scheme}://{request.headers['host']}{CALLBACK_PATH}"

    @app.get(START_PATH, include_in_schema=False)
    def start(request: Request, next: str = "/") -> Response:
        flow = flows.start(safe_next(next))
        try:
            url = client.authorization_url(callback_url(request), flow)
        except (requests.RequestException, KeyError, ValueError) as exc:
            return HTMLResponse(f"<!doctype html><p>The hospital sign-in service cannot be reached "
                                f"({escape(type(exc).__name__)}). <a href=\"/login\">Log in</a></p>", status_code=503)
        response = RedirectResponse(url, status_code=303)
        response.set_cookie(FLOW_COOKIE, flow.state, max_age=int(FLOW_SECONDS), path=CALLBACK_PATH, httponly=True,
                            samesite="lax", secure=request.url.scheme == "https")
        return response

    @app.get(CALLBACK_PATH, include_in_schema=False)
    async def callback(request: Request, state: str = "", code: str = "", error: str = "") -> Response:
        ip = client_ip(request)
        flow = flows.finish(state) if state and request.cookies.get(FLOW_COOKIE) == state else None
        try:
            if flow is None:
                raise OidcError("unknown, expired or foreign sign-in state")
            if error or not code:
                raise OidcError(f"the provider refused: {error or 'no code'}")
            name, role = await run_in_threadpool(client.identity, code, callback_url(request), flow)
            try:
                user = await run_in_threadpool(accounts.external_user, name, role)
            except AccountError as exc:
                raise OidcError(str(exc)) from exc
        except OidcError as exc:
            audit.login("(OpenID Connect)", ip, ok=False, why=str(exc))
            return HTMLResponse(f"<!doctype html><p>Sign-in refused: {escape(str(exc))}. "
                                f'<a href="/login?next={quote(flow.target if flow else "/")}">Log in</a></p>',
                                status_code=403)
        audit.login(user.name, ip, ok=True)
        response = await start_session(_moving_on(flow.target), request, accounts, user, session_minutes)
        response.delete_cookie(FLOW_COOKIE, path=CALLBACK_PATH)
        return response
