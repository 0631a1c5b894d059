"""Who may reach what on the HTTP port, checked for every request before any route runs.

- Host allow-list (`allowed_hosts`): any other Host header gets 400 (DNS rebinding, Host spoofing).
- Authentication, deny by default: a login session (cookie) or an API token (`Authorization: Bearer`).
  Only /health, /metrics, /login (and /login/oidc/...) and /static/ are open; anonymous page requests
  are sent to the login page, anything else gets 401.
- CSRF: a state-changing request on a session must come from our own origin (Origin, else Referer) and
  carry the session's CSRF token in the X-CSRF-Token header, else 403. The login form is checked for
  its origin. Bearer-token requests carry no cookie, so a browser cannot be made to send one.
- Roles: re-run and re-send depend on `require_admin` (403 for a radiologist), feedback on the findings
  on `require_reviewer` (403 for a viewer).
- Every answer forbids framing (no clickjacking of the Re-run button), MIME sniffing and sending the
  address to other sites; over HTTPS it also tells the browser to keep to HTTPS (HSTS).
"""
from __future__ import annotations

import hmac
from urllib.parse import quote

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from lungnode.accounts import Accounts, Principal

SESSION_COOKIE = "lungnode_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/health", "/metrics", "/login", "/login/oidc", "/login/oidc/callback"})
OPEN_PREFIXES = ("/static/",)
LOGIN_PATH = "/login"
HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}
HSTS = "max-age=31536000"


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def same_origin(request: Request) -> bool:
    """The request was sent by a page of this server: its Origin (or, without one, its Referer) is ours."""
    ours = f"{request.url.scheme}://{request.headers.get('host', '')}"
    origin = request.headers.get("origin")
    if origin is not None:
        return origin == ours
    referer = request.headers.get("referer", "")
    return referer == ours or referer.startswith(ours + "/")


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def principal(request: Request) -> Principal:
    """The authenticated caller (the middleware has refused anonymous requests before any route)."""
    return request.state.principal


def require_admin(request: Request) -> Principal:
    p = principal(request)
    if not p.is_admin:
        raise HTTPException(403, "this needs the admin role")
    return p


def require_reviewer(request: Request) -> Principal:
    p = principal(request)
    if not p.can_review:
        raise HTTPException(403, "recording feedback needs the radiologist or admin role")
    return p


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _refuse_anonymous(request: Request) -> Response:
    wants_page = (request.method == "GET" and not request.url.path.startswith("/api/")
                  and "text/html" in request.headers.get("accept", ""))
    if wants_page:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        lang = request.query_params.get("lang")  # the login page in the language asked for
        login = f"{LOGIN_PATH}?next={quote(target, safe='')}" + (f"&lang={quote(lang)}" if lang else "")
        return RedirectResponse(login, status_code=303)
    return JSONResponse({"detail": "log in first, or send an API token (Authorization: Bearer)"}, status_code=401,
                        headers={"WWW-Authenticate": "Bearer"})


def _forbidden(why: str) -> Response:
    return JSONResponse({"detail": why}, status_code=403)


def install_security(app: FastAPI, accounts: Accounts, allowed_hosts: list[str]) -> None:
    @app.middleware("http")
    async def authenticate(request: Request, call_next) -> Response:
        unsafe = request.method not in SAFE_METHODS
        token, session = _bearer(request), request.cookies.get(SESSION_COOKIE)
        if token is not None:
            who = await run_in_threadpool(accounts.principal_for_token, token)
        elif session:
            who = await run_in_threadpool(accounts.principal_for_session, session)
        else:
            who = None
        request.state.principal = who
        if is_open(request.url.path):
            if unsafe and not same_origin(request):
                return _forbidden("cross-origin request refused")
            return await call_next(request)
        if who is None:
            return _refuse_anonymous(request)
        if unsafe and who.csrf is not None:
            if not same_origin(request):
                return _forbidden("cross-origin request refused")
            if not hmac.compare_digest(request.headers.get(CSRF_HEADER, "").encode(), who.csrf.encode()):
                return _forbidden(f"missing or wrong {CSRF_HEADER} header")
        return await call_next(request)

    # Middleware added later runs earlier: the headers go on every answer, refusals included.
    @app.middleware("http")
    async def secure_headers(request: Request, call_next) -> Response:
        response = await call_next(request)
        response.headers.update(HEADERS)
        if request.url.scheme == "https":
            response.headers["Strict-Transport-Security"] = HSTS
        return response

    # Added last, so it runs first: a request for another host is refused before anything else.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
