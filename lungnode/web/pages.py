"""The HTML pages: a server-rendered shell in the chosen language; the page scripts fill it from the
JSON API and poll it, so a study appears and finishes without a reload."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from lungnode.accounts import Principal
from lungnode.node import Node
from lungnode.web.i18n import LABELS, labels, language

WEB = Path(__file__).resolve().parent
POLL_SECONDS = 3


class Render(Protocol):
    def __call__(self, request: Request, name: str, lang: str | None, status_code: int = 200,
                 **context) -> HTMLResponse: ...


def renderer(node: Node) -> Render:
    """Renders a template with the page context: language, labels, and for a logged-in user who they are,
    their CSRF token (the page scripts send it with every POST) and the node's identity."""
    templates = Jinja2Templates(directory=WEB / "templates")

    def render(request: Request, name: str, lang: str | None, status_code: int = 200, **context) -> HTMLResponse:
        lang = language(lang)
        page = {"lang": lang, "labels": labels(lang), "poll_ms": POLL_SECONDS * 1000, **context}
        who: Principal | None = request.state.principal
        if who is not None:
            model = node.detector.spec.info.name if node.detector else "-"
            page |= {"user": {"name": who.name, "role": who.role}, "csrf": who.csrf,
                     "node": {"ae": node.settings.ae_title, "port": node.settings.dicom_port, "model": model}}
        return templates.TemplateResponse(request, name, {"page": page, "L": page["labels"], "languages": {
            code: LABELS[code]["language"] for code in LABELS}}, status_code=status_code)

    return render


def add_pages(app: FastAPI, node: Node, render: Render) -> None:
    app.mount("/static", StaticFiles(directory=WEB / "static"), name="static")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def worklist(request: Request, lang: str | None = None) -> HTMLResponse:
        return render(request, "worklist.html", lang)

    @app.get("/studies/{study_uid}", response_class=HTMLResponse, include_in_schema=False)
    def study(request: Request, study_uid: str, lang: str | None = None) -> HTMLResponse:
        if node.db.study(study_uid) is None:
            raise HTTPException(404, f"no study {study_uid}")
        return render(request, "study.html", lang, study_uid=study_uid)
