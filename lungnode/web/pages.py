"""The HTML pages: a server-rendered shell in the chosen language; the page scripts fill it from the
JSON API and poll it, so a study appears and finishes without a reload."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from lungnode.node import Node
from lungnode.web.i18n import LABELS, labels, language

WEB = Path(__file__).resolve().parent
POLL_SECONDS = 3


def add_pages(app: FastAPI, node: Node) -> None:
    templates = Jinja2Templates(directory=WEB / "templates")
    app.mount("/static", StaticFiles(directory=WEB / "static"), name="static")

    def render(request: Request, name: str, lang: str | None, **context) -> HTMLResponse:
        lang = language(lang)
        model = node.detector.spec.info.name if node.detector else "-"
        page = {"lang": lang, "labels": labels(lang), "poll_ms": POLL_SECONDS * 1000,
                "node": {"ae": node.settings.ae_title, "port": node.settings.dicom_port, "model": model}, **context}
        return templates.TemplateResponse(request, name, {"page": page, "L": page["labels"], "languages": {
            code: LABELS[code]["language"] for code in LABELS}})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def worklist(request: Request, lang: str | None = None) -> HTMLResponse:
        return render(request, "worklist.html", lang)

    @app.get("/studies/{study_uid}", response_class=HTMLResponse, include_in_schema=False)
    def study(request: Request, study_uid: str, lang: str | None = None) -> HTMLResponse:
        if node.db.study(study_uid) is None:
            raise HTTPException(404, f"no study {study_uid}")
        return render(request, "study.html", lang, study_uid=study_uid)
