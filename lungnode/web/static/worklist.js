// The worklist: every study the node has seen, refreshed from /api/studies every few seconds.
"use strict";

// Series UIDs make a refusal reason unreadable in a table row; the full text stays in the tooltip.
function shortReason(reason) {
  return reason.replace(/series [0-9.]+ \(([^)]*)\)/g, "“$1”");
}

function studyRow(s) {
  const href = withLang(`/studies/${encodeURIComponent(s.study_uid)}`);
  const why = s.reason && (s.state === "not_processed" || s.state === "failed")
    ? el("div", { class: "why", title: s.reason }, shortReason(s.reason)) : null;
  return el("tr", { "data-study-uid": s.study_uid, class: "link", onclick: () => { window.location = href; } },
    el("td", { class: "patient" }, el("a", { href }, personName(s.patient_name) || "—")),
    el("td", {}, s.patient_id),
    el("td", {}, s.accession),
    el("td", {}, dicomDate(s.study_date)),
    el("td", { class: "description" }, s.description),
    el("td", { class: "nowrap" }, when(s.first_received)),
    el("td", { class: "status" }, stateBadge(s), pendingBadge(s), why),
    el("td", { class: "num findings" }, s.state === "not_processed" ? "–" : s.findings ?? ""),
    s.verified
      ? el("td", { class: "review", "data-review": "verified" },
           t("verified_by", { user: s.verified.user, when: when(s.verified.completed_at) }))
      : el("td", { class: "review", "data-review": s.review ? (s.review.complete ? "complete" : "started") : "none" },
           s.state === "done" || s.review ? reviewText(s.review) : ""),
    el("td", { class: "model" }, s.model || ""));
}

async function refresh() {
  const studies = await getJSON("/api/studies");
  document.getElementById("rows").replaceChildren(...studies.map(studyRow));
  const empty = document.getElementById("empty");
  empty.textContent = t("empty", P.node);
  empty.hidden = studies.length > 0;
}

every(P.poll_ms, refresh);
