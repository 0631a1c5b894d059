"""POST a FHIR transaction Bundle to the FHIR server and insist that all of it was applied.

A transaction is all-or-nothing on the server; it counts as delivered only on HTTP 2xx with a
transaction-response whose every entry has a 2xx status. Otherwise `SendError` carries the server's
OperationOutcome text, the outbox records it and retries later.
"""
from __future__ import annotations

import requests

from lungnode.reports.send import SendError

FHIR_JSON = "application/fhir+json"


def post_bundle(base_url: str, bundle: bytes, timeout: float = 30.0) -> dict:
    """POST ``bundle`` (JSON) to the base URL; returns the transaction-response Bundle."""
    try:
        r = requests.post(base_url.rstrip("/"), data=bundle, timeout=timeout,
                          headers={"Content-Type": f"{FHIR_JSON}; charset=utf-8", "Accept": FHIR_JSON})
    except requests.RequestException as exc:
        raise SendError(f"FHIR {base_url}: {type(exc).__name__}: {exc}") from exc
    try:
        body = r.json()
    except ValueError:
        body = None
    body = body if isinstance(body, dict) else {}
    if not r.ok:
        raise SendError(f"FHIR {base_url} refused the transaction (HTTP {r.status_code}): "
                        f"{outcome_text(body) or r.text[:500]}")
    if body.get("resourceType") != "Bundle" or body.get("type") != "transaction-response":
        raise SendError(f"FHIR {base_url}: HTTP {r.status_code} but no transaction-response Bundle in the answer")
    answers = [e.get("response", {}) for e in body.get("entry", [])]
    failed = [a for a in answers if not str(a.get("status", "")).startswith("2")]
    if failed:
        raise SendError(f"FHIR {base_url}: {len(failed)} entry(ies) not applied: "
                        + "; ".join(f"{a.get('status')} {outcome_text(a.get('outcome', {}))}" for a in failed))
    return body


def outcome_text(outcome: dict) -> str:
    """The human-readable part of an OperationOutcome (empty for anything else)."""
    if outcome.get("resourceType") != "OperationOutcome":
        return ""
    return "; ".join(
        " ".join(filter(None, [i.get("severity"), i.get("diagnostics") or i.get("details", {}).get("text"),
                               ",".join(i.get("expression", []))]))
        for i in outcome.get("issue", []))
