// The radiologist's review on the study page: confirm or reject each finding (with a reason), add the
// nodules the model missed by clicking them on the slice, mark the review complete. Uses study.js's
// `api`, `$`, `viewer`, `show` and `notice`. Once a verified version was made from the completed review,
// the page shows its findings (study.js) and this asks for nothing more, until the review is reopened.
"use strict";
const REASONS = ["vessel", "airway", "scar", "outside_lung", "artefact", "other"];
let review = null; // the /feedback answer shown
let reviewShown = ""; // ... as JSON, to redraw only when it changed (a half-chosen reason survives polling)
let adding = false;

async function refreshReview() {
  const answer = await getJSON(`${api}/feedback`);
  if (JSON.stringify(answer) !== reviewShown) showReview(answer);
}

// The latest version was verified from this (complete) review: the rows are its findings, not the reviewed ones.
function verifiedShown() {
  return review && review.completion !== null && review.latest_version !== review.version;
}

function showReview(answer) {
  review = answer;
  reviewShown = JSON.stringify(answer);
  const verified = verifiedShown();
  document.querySelectorAll("#findings tbody tr").forEach((row) => {
    const n = Number(row.dataset.nodule);
    const v = verified ? null : review.verdicts.find((x) => x.finding === n);
    row.dataset.verdict = v ? v.verdict : "";
    row.querySelector("td.review").replaceChildren(...(verified ? [] : verdictCell(n, v)));
  });
  $("added").querySelector("tbody").replaceChildren(...(verified ? [] : review.added.map(addedRow)));
  $("added").hidden = verified || review.added.length === 0;
  $("no-added").hidden = verified || review.added.length > 0;
  $("added-title").hidden = verified;
  const c = review.counts;
  const started = c.complete || c.confirmed + c.rejected + c.added > 0;
  const state = $("review-state");
  state.dataset.review = verified ? "verified" : c.complete ? "complete" : started ? "started" : "none";
  state.textContent = reviewText(started ? c : null) + (review.completion
    ? ` · ${t("by", { user: review.completion.completed_by, when: when(review.completion.completed_at) })}` : "");
  $("complete-review").hidden = !review.can_write || c.complete;
  $("reopen-review").hidden = !review.can_write || !c.complete;
  $("read-only").hidden = review.can_write;
  $("add-bar").hidden = !review.can_write || verified;
  const note = verifiedNote();
  $("verified-state").textContent = note;
  $("verified-state").hidden = !note;
  if (viewer) show(Number($("slider").value)); // the added nodules' marks
}

// What becomes of the verdict: sent as a verified version or not, and how far that got.
function verifiedNote() {
  const job = review.verification;
  if (!review.send_verified) return review.can_write ? L.verified_off : "";
  if (!review.completion) {
    return review.latest_version !== review.version ? t("verified_reopened", { version: review.latest_version })
      : review.can_write ? L.verified_on : "";
  }
  if (job && job.state === "pending") return L.verified_pending;
  if (job && job.state === "dropped") return t("verified_dropped", { reason: job.reason });
  return "";
}

function button(label, cls, fn) {
  return el("button", { type: "button", class: cls, onclick: (e) => { e.stopPropagation(); fn(); } }, label);
}

function verdictCell(n, v) {
  const out = [];
  if (v) {
    const why = v.verdict === "rejected" ? `: ${t("reason_" + v.reason)}${v.reason_text ? ` (${v.reason_text})` : ""}` : "";
    out.push(el("span", { class: `badge verdict-${v.verdict}`, "data-verdict": v.verdict }, t("verdict_" + v.verdict) + why),
             el("div", { class: "muted by" }, t("by", { user: v.user, when: when(v.at) })));
  }
  if (!review.can_write) return out;
  const stop = (e) => e.stopPropagation();
  const reason = el("select", { class: "reason", onclick: stop, "aria-label": L.reason_choose },
    el("option", { value: "" }, L.reason_choose), ...REASONS.map((r) => el("option", { value: r }, t("reason_" + r))));
  const text = el("input", { class: "reason-text", placeholder: L.reason_text, maxlength: 500, hidden: true, onclick: stop });
  reason.addEventListener("change", () => { text.hidden = reason.value !== "other"; });
  out.push(el("div", { class: "verdict-actions" },
    v && v.verdict === "confirmed" ? null : button(L.confirm, "confirm", () => write("PUT", `findings/${n}`,
      { version: review.version, verdict: "confirmed" })),
    reason, text,
    button(L.reject, "reject", () => reason.value
      ? write("PUT", `findings/${n}`, { version: review.version, verdict: "rejected", reason: reason.value,
                                         reason_text: text.value || null })
      : reason.focus()),
    v ? button(L.withdraw, "withdraw", () => write("DELETE", `findings/${n}?version=${review.version}`)) : null));
  return out;
}

function addedRow(a) {
  return el("tr", { "data-added": a.id, class: "link", onclick: () => show(a.click.slice) },
    el("td", {}, el("strong", {}, `A${a.id}`)),
    el("td", { class: "nowrap" }, a.center_mm.map((v) => v.toFixed(1)).join(", ")),
    el("td", { class: "num" }, `${a.diameter_mm.toFixed(1)} mm`),
    el("td", { class: "num" }, a.click.slice + 1),
    el("td", {}, el("span", { class: "muted by" }, t("by", { user: a.user, when: when(a.at) })), " ",
       review.can_write ? button(L.remove, "remove", () => write("DELETE", `added/${a.id}?version=${review.version}`)) : null));
}

// The added nodules drawn on slice k: an ellipse of their diameter on the slices their sphere crosses.
function addedMarks(k) {
  if (!review || !viewer || verifiedShown()) return []; // a verified version's added nodules are its findings
  const [sx, sy, sz] = viewer.spacing_mm;
  return review.added.filter((a) => Math.abs(a.click.slice - k) * sz <= a.diameter_mm / 2).flatMap((a) => {
    const { slice, column_px: x, row_px: y } = a.click;
    const rx = a.diameter_mm / 2 / sx;
    return [svg("ellipse", { class: slice === k ? "added centre" : "added", "data-added": a.id, cx: x, cy: y, rx,
                             ry: a.diameter_mm / 2 / sy }),
            svg("text", { class: "added-label", x: x + rx + 2, y, "font-size": viewer.columns / 28 }, `A${a.id}`)];
  });
}

async function write(method, path, body) {
  const response = await send(method, `${api}/feedback/${path}`, body);
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof answer.detail === "string" ? answer.detail : JSON.stringify(answer.detail || response.status);
    notice(t("action_failed", { message: detail }), false);
    return;
  }
  $("notice").hidden = true;
  showReview(answer);
}

function setAdding(on) {
  adding = on;
  $("add-nodule").classList.toggle("active", on);
  $("add-nodule").textContent = on ? L.cancel : L.add_nodule;
  $("add-hint").hidden = !on;
  $("stack").classList.toggle("adding", on);
}

$("add-nodule").addEventListener("click", () => setAdding(!adding));
$("stack").addEventListener("click", (e) => {
  if (!adding || !viewer) return;
  const box = $("stack").getBoundingClientRect();
  setAdding(false);
  write("POST", "added", { version: review.version, slice: Number($("slider").value),
                           column_px: (e.clientX - box.left) / box.width * viewer.columns,
                           row_px: (e.clientY - box.top) / box.height * viewer.rows,
                           diameter_mm: Number($("add-diameter").value) || 6 });
});
$("complete-review").addEventListener("click", () => write("POST", "complete", { version: review.version }));
$("reopen-review").addEventListener("click", () => write("DELETE", `complete?version=${review.version}`));
