"""REST API of a running node (studies, their state and findings, re-run and re-send)."""
from __future__ import annotations

import json
from dataclasses import asdict

from fastapi import FastAPI, HTTPException

from lungnode import __version__
from lungnode.node import Node
from lungnode.pipeline import results_dir_for


def create_app(node: Node) -> FastAPI:
    app = FastAPI(title="lungnode", version=__version__,
                  description="AI lung-nodule detection beside the PACS: studies received, results sent.")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "version": __version__, "ae_title": node.settings.ae_title,
                "dicom_port": node.settings.dicom_port, "model": node.detector.spec.info.name
                if node.detector else None, "pending_deliveries": node.db.pending_count()}

    @app.get("/api/studies")
    def studies() -> list[dict]:
        return [asdict(s) for s in node.db.studies()]

    @app.get("/api/studies/{study_uid}")
    def study(study_uid: str) -> dict:
        s = node.db.study(study_uid)
        if s is None:
            raise HTTPException(404, f"no study {study_uid}")
        out = asdict(s)
        result_json = results_dir_for(node.settings.results_dir, study_uid, s.version) / "result.json"
        out["result"] = json.loads(result_json.read_text()) if s.version and result_json.exists() else None
        out["deliveries"] = [{**asdict(d), "path": str(d.path)} for d in node.db.deliveries(study_uid)]
        return out

    @app.post("/api/studies/{study_uid}/rerun")
    def rerun(study_uid: str) -> dict:
        if not node.rerun(study_uid):
            raise HTTPException(409, "unknown study, or it is being processed right now")
        return {"queued": True}

    @app.post("/api/studies/{study_uid}/resend")
    def resend(study_uid: str) -> dict:
        if not node.resend(study_uid):
            raise HTTPException(409, "no results to send, or no PACS configured (LUNGNODE_PACS)")
        return {"queued": True}

    return app
