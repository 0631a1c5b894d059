"""The login page, signing in (a server-side session in an HttpOnly, SameSite=Strict cookie, Secure
over HTTPS) and signing out. Each attempt, good or bad, and each logout goes to the audit trail; password
guessing is cut off by lungnode.web.throttle."""
from __future__ import annotations

from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from lungnode.accounts import Accounts, User
from lungnode.audit import AuditTrail
from lungnode.web.pages import Render
from lungnode.web.security import SESSION_COOKIE, client_ip, principal
from lungnode.web.throttle import LoginThrottle


class LoggedOut(BaseModel):
    logged_out: bool


class Me(BaseModel):
    """Who is logged in, and the token a client that holds the session cookie sends as X-CSRF-Token with
    each POST (None for an API token: it needs none)."""

    name: str
    role: str
    csrf_token: str | None


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this server only (never another site)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _cookie(response: Response, request: Request, value: str, max_age: int) -> None:
    response.set_cookie(SESSION_COOKIE, value, max_age=max_age, path="/", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")


async def start_session(response: Response, request: Request, accounts: Accounts, user: User,
                        minutes: float) -> Response:
    """Log the user in on `response`: a new session in the cookie; one the browser had before is closed."""
    if previous := request.cookies.get(SESSION_COOKIE):
        await run_in_threadpool(accounts.close_session, previous)
    _cookie(response, request, await run_in_threadpool(accounts.open_session, user, minutes), int(minutes * 60))
    return response


def add_login(app: FastAPI, accounts: Accounts, audit: AuditTrail, render: Render, session_minutes: float,
              oidc: bool) -> None:
    """The login routes; `oidc`: the page also offers sign-in with the hospital's provider (lungnode.web.oidc)."""
    throttle = LoginThrottle()

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request, next: str = "/", lang: str | None = None) -> HTMLResponse:
        return render(request, "login.html", lang, next=safe_next(next), oidc=oidc)

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode(errors="replace")).items()}
        name, target, lang = form.get("username", "")[:64], safe_next(form.get("next")), form.get("lang")
        ip = client_ip(request)
        if throttle.blocked(name, ip):
            audit.login(name, ip, ok=False, why="too many failed logins: refused without checking the password")
            return render(request, "login.html", lang, status_code=429, next=target, username=name, blocked=True,
                          oidc=oidc)
        user = await run_in_threadpool(accounts.authenticate, name, form.get("password", ""))
        audit.login(name, ip, ok=user is not None)
        if user is None:
            throttle.failed(name, ip)
            return render(request, "login.html", lang, status_code=401, next=target, username=name, failed=True,
                          oidc=oidc)
        throttle.succeeded(name)
        return await start_session(RedirectResponse(target, status_code=303), request, accounts, user, session_minutes)

    @app.get("/api/me", summary="Who this request is authenticated as, and its CSRF token", response_model=Me)
    def me(request: Request) -> Me:
        who = principal(request)
        return Me(name=who.name, role=who.role, csrf_token=who.csrf)

    @app.post("/logout", summary="End this login session", response_model=LoggedOut)
    def logout(request: Request) -> Response:
        session = request.cookies.get(SESSION_COOKIE)
        if session:
            accounts.close_session(session)
        audit.logout(principal(request).name, client_ip(request))
        response = JSONResponse({"logged_out": True})
        _cookie(response, request, "", 0)
        return response
