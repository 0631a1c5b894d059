// One study: header and deliveries refresh every few seconds; findings, key images and the slice viewer
// are rebuilt when a new results version appears; the radiologist's review is review.js.
"use strict";
const uid = P.study_uid;
const api = `/api/studies/${encodeURIComponent(uid)}`;
const $ = (id) => document.getElementById(id);
let shownVersion = null;
let viewer = null; // the /viewer answer while a series is shown

function fact(key, value) {
  return value === null || value === undefined || value === "" ? []
    : [el("div", { class: "fact", "data-fact": key }, el("dt", {}, L[key]), el("dd", {}, value))];
}

function renderHead(s) {
  $("patient-name").textContent = personName(s.patient_name) || s.patient_id || uid;
  $("facts").replaceChildren(
    ...fact("patient_id", s.patient_id), ...fact("accession", s.accession),
    ...fact("study_date", dicomDate(s.study_date)), ...fact("description", s.description),
    ...fact("status", el("span", {}, stateBadge(s), pendingBadge(s))),
    ...fact("findings", s.state === "not_processed" ? null : s.findings), ...fact("model", s.model),
    ...fact("version", s.version || null),
    ...fact("verified", s.verified ? `${t("verified_by", { user: s.verified.user, when: when(s.verified.completed_at) })} · `
      + t("verified_from", { version: s.verified.version, reviewed: s.verified.reviewed_version }) : null),
    ...fact("processing_time", s.seconds ? `${s.seconds.toFixed(1)} s` : null));
  const reason = $("reason");
  reason.hidden = !(s.reason && (s.state === "not_processed" || s.state === "failed"));
  reason.replaceChildren(el("strong", {}, `${t("state_" + s.state)} · ${L.reason}: `), s.reason || "");
}

function renderDeliveries(s) {
  const withKind = s.deliveries.some((d) => d.kind);
  document.querySelectorAll("#deliveries .kind").forEach((th) => { th.hidden = !withKind; });
  $("deliveries").querySelector("tbody").replaceChildren(...s.deliveries.slice().reverse().map((d) =>
    el("tr", { "data-delivery": d.id },
      el("td", {}, d.destination),
      withKind ? el("td", {}, d.kind || "") : null,
      el("td", {}, d.version),
      el("td", {}, el("span", { class: `badge delivery-${d.state}` }, t("delivery_state_" + d.state))),
      el("td", { class: "num" }, d.attempts),
      el("td", { class: "error" }, d.last_error || ""))));
  $("deliveries").hidden = s.deliveries.length === 0;
  $("no-deliveries").hidden = s.deliveries.length > 0;
}

function renderFindings(s) {
  const detections = s.result ? s.result.detections : [];
  const added = s.added_by_radiologist; // a verified version: these have no model score
  $("findings").querySelector("tbody").replaceChildren(...detections.map((d, i) =>
    el("tr", { class: "link", "data-nodule": i + 1, onclick: () => goTo(i + 1) },
      el("td", {}, el("strong", {}, `N${i + 1}`)),
      el("td", { class: "nowrap" }, d.center_mm.map((v) => v.toFixed(1)).join(", ")),
      el("td", { class: "num" }, `${d.diameter_mm.toFixed(1)} mm`),
      el("td", { class: "num score" }, added.includes(i + 1) ? L.added_by_radiologist : d.score.toFixed(2)),
      el("td", { class: "num slice-no" }, ""),
      el("td", { class: "review" }))));
  $("findings").hidden = detections.length === 0;
  $("no-findings").hidden = !s.result || detections.length > 0;
  $("key-images").replaceChildren(...s.key_images.map((k) =>
    el("a", { href: k.url, target: "_blank", class: "thumb" },
      el("img", { src: k.thumbnail_url, alt: `N${k.number}`, loading: "lazy" }), el("span", {}, `N${k.number}`))));
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text) node.textContent = text;
  return node;
}

function show(k) {
  if (!viewer) return;
  k = Math.max(0, Math.min(viewer.slices - 1, k));
  $("slider").value = k;
  $("slice").src = `${api}/slices/${k}`;
  $("slice-label").textContent = t("slice_of", { k: k + 1, n: viewer.slices });
  const pad = Math.max(3, viewer.columns / 120);
  const marks = viewer.nodules.filter((n) => n.first_slice <= k && k <= n.last_slice);
  $("overlay").replaceChildren(...marks.flatMap((n) => {
    const [x0, y0, x1, y1] = n.box_px;
    const cls = n.slice === k ? "box centre" : "box";
    return [svg("rect", { class: cls, "data-nodule": n.number, x: x0 - pad, y: y0 - pad,
                          width: x1 - x0 + 2 * pad, height: y1 - y0 + 2 * pad }),
            svg("text", { class: "box-label", x: x0 - pad, y: y0 - 2 * pad, "font-size": viewer.columns / 28 },
                `N${n.number}`)];
  }), ...addedMarks(k));
  document.querySelectorAll("#goto button").forEach((b) => b.classList.toggle("active", Number(b.dataset.slice) === k));
}

function goTo(number) {
  const n = viewer && viewer.nodules.find((m) => m.number === number);
  if (n) show(n.slice);
}

async function loadViewer(s) {
  viewer = null;
  $("viewer").hidden = true;
  $("goto").replaceChildren();
  const processed = s.result && s.result.series_instance_uid && !s.result.not_processed_reason;
  $("no-viewer").textContent = processed ? L.loading : L.no_viewer;
  $("no-viewer").hidden = false;
  if (!processed) return;
  viewer = await getJSON(`${api}/viewer`);
  const [sx, sy] = viewer.spacing_mm;
  $("stack").style.aspectRatio = `${viewer.columns * sx} / ${viewer.rows * sy}`;
  $("overlay").setAttribute("viewBox", `0 0 ${viewer.columns} ${viewer.rows}`);
  $("slider").max = viewer.slices - 1;
  $("goto").replaceChildren(...(viewer.nodules.length ? [el("span", { class: "muted" }, L.go_to)] : []),
    ...viewer.nodules.map((n) =>
      el("button", { type: "button", "data-nodule": n.number, "data-slice": n.slice, onclick: () => goTo(n.number) },
         `N${n.number}`)));
  viewer.nodules.forEach((n) => {
    const cell = document.querySelector(`#findings tr[data-nodule="${n.number}"] .slice-no`);
    if (cell) cell.textContent = n.slice + 1;
  });
  $("no-viewer").hidden = true;
  $("viewer").hidden = false;
  show(viewer.nodules.length ? viewer.nodules[0].slice : Math.floor(viewer.slices / 2));
}

async function refresh() {
  const s = await getJSON(api);
  renderHead(s);
  renderDeliveries(s);
  if (s.shown_version !== shownVersion) {
    renderFindings(s);
    await loadViewer(s);
    shownVersion = s.shown_version;
    reviewShown = ""; // the rows are new: draw the review into them again
  }
  await refreshReview();
}

function notice(text, ok) {
  const box = $("notice");
  box.textContent = text;
  box.className = ok ? "notice ok" : "notice bad";
  box.hidden = false;
}

function action(button, path, confirmKey, okKey) {
  if (!$(button)) return; // shown to admins only
  $(button).addEventListener("click", async () => {
    if (!window.confirm(L[confirmKey])) return;
    const response = await post(`${api}/${path}`);
    const body = await response.json().catch(() => ({}));
    notice(response.ok ? L[okKey] : t("action_failed", { message: body.detail || response.status }), response.ok);
    await refresh();
  });
}

$("slider").addEventListener("input", (e) => show(Number(e.target.value)));
$("stack").addEventListener("wheel", (e) => {
  e.preventDefault();
  show(Number($("slider").value) + Math.sign(e.deltaY));
}, { passive: false });
action("rerun", "rerun", "confirm_rerun", "rerun_ok");
action("resend", "resend", "confirm_resend", "resend_ok");
// review.js (loaded after this script) draws into the rows and the overlay: poll once both are in.
document.addEventListener("DOMContentLoaded", () => every(P.poll_ms, refresh));
