// Shared by the pages: labels, formatting, and small DOM helpers. window.LUNGNODE comes from the template.
"use strict";
const P = window.LUNGNODE;
const L = P.labels;

function t(key, vars) {
  return (L[key] || key).replace(/\{(\w+)\}/g, (_, name) => (vars && name in vars ? vars[name] : ""));
}

function withLang(url) {
  return url + (url.includes("?") ? "&" : "?") + "lang=" + P.lang;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function personName(pn) {
  const [family, given, middle] = (pn || "").split("^");
  const rest = [given, middle].filter(Boolean).join(" ");
  return [family, rest].filter(Boolean).join(", ");
}

function dicomDate(d) {
  return d && d.length === 8 ? `${d.slice(0, 4)}-${d.slice(4, 6)}-${d.slice(6)}` : d || "";
}

function when(epoch) {
  if (!epoch) return "";
  const d = new Date(epoch * 1000);
  const p = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}`;
}

function stateBadge(study) {
  return el("span", { class: `badge state-${study.state}`, "data-state": study.state }, t("state_" + study.state));
}

function pendingBadge(study) {
  return study.pending_deliveries > 0
    ? el("span", { class: "badge pending", "data-pending": study.pending_deliveries }, t("delivery_pending"))
    : null;
}

function toLogin() {
  window.location.assign(`/login?next=${encodeURIComponent(location.pathname + location.search)}&lang=${P.lang}`);
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (response.status === 401) toLogin(); // the session ended: log in again
  if (!response.ok) throw new Error(`${response.status} ${url}`);
  return response.json();
}

// Every state-changing request carries the session's CSRF token; the server refuses it without.
function post(url) {
  return fetch(url, { method: "POST", headers: { "X-CSRF-Token": P.csrf } });
}

// The same for a JSON body (PUT, POST) or none (DELETE).
function send(method, url, body) {
  const headers = { "X-CSRF-Token": P.csrf };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  return fetch(url, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
}

// The review column of the worklist and the study page: not reviewed / counts / complete.
function reviewText(review) {
  if (!review) return L.review_none;
  return review.complete ? L.review_complete : t("review_counts", review);
}

function every(ms, fn) {
  const tick = () => fn().catch((err) => console.warn(err)).finally(() => setTimeout(tick, ms));
  tick();
}

if (P.user) {
  document.getElementById("node-info").textContent = t("node_info", P.node);
  document.getElementById("logout").addEventListener("click", async () => {
    await post("/logout");
    window.location.assign(`/login?lang=${P.lang}`);
  });
}
