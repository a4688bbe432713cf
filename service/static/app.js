// The try-it page. Talks to the public API only, with URLs relative to the page, so the service can
// sit behind a path prefix. No framework and no build step: the browser runs this file as it is.
"use strict";

const $ = (id) => document.getElementById(id);

const form = $("restore-form");
const fileInput = $("file");
const dropZone = $("drop-zone");
const restoreButton = $("restore");
const cancelButton = $("cancel");
const statusLine = $("status");
const errorBox = $("error");
const result = $("result");
const compare = $("compare");
const slider = $("slider");
const beforeImg = $("before");
const afterImg = $("after");
const download = $("download");

let chosenFile = null;
let inFlight = null; // AbortController of the request in progress
let countdownTimer = null;
const objectUrls = { before: null, after: null };

// ---- Server-Timing and Retry-After ---------------------------------------------------------------

/** "decode;dur=1.2, inference;dur=40;desc=\"x\"" -> [{name: "decode", dur: 1.2, desc: ""}, ...] */
function parseServerTiming(header) {
  if (!header) return [];
  const metrics = [];
  for (const part of header.split(",")) {
    const [name, ...params] = part.split(";").map((s) => s.trim());
    if (!name) continue;
    const metric = { name, dur: null, desc: "" };
    for (const param of params) {
      const eq = param.indexOf("=");
      if (eq < 0) continue;
      const key = param.slice(0, eq).trim().toLowerCase();
      const value = param.slice(eq + 1).trim().replace(/^"(.*)"$/, "$1");
      if (key === "dur" && Number.isFinite(Number(value))) metric.dur = Number(value);
      if (key === "desc") metric.desc = value;
    }
    metrics.push(metric);
  }
  return metrics;
}

/** Retry-After is either delay-seconds or an HTTP date; returns whole seconds, or null. */
function parseRetryAfter(header) {
  if (!header) return null;
  if (/^\s*\d+\s*$/.test(header)) return Number(header);
  const when = Date.parse(header);
  return Number.isNaN(when) ? null : Math.max(0, Math.ceil((when - Date.now()) / 1000));
}

// ---- messages for the API's errors -----------------------------------------------------------------

const seconds = (n) => `${n} second${n === 1 ? "" : "s"}`;

/** A headline in plain words for each status the API documents; the server's detail goes below it. */
function headline(status, retryAfter) {
  // With Retry-After the countdown line below says when; without it, say "a moment".
  const wait = retryAfter != null ? "" : " Try again in a moment.";
  switch (status) {
    case 400:
    case 422: return "The server could not read this file as an image.";
    case 401:
    case 403: return "The server needs a valid API token: enter it under Options.";
    case 404: return "This server does not offer this task.";
    case 406: return "The server cannot send the result in the chosen format.";
    case 413: return "This image is too large for the server. Try a smaller one.";
    case 415: return "This file type is not supported. Try a PNG, JPEG or WebP image.";
    case 429: return "The server is busy with other images." + wait;
    case 503: return "The service is not ready (starting up or shutting down)." + wait;
    case 504: return "The server could not finish this image in time. Try a smaller image.";
    default: return `Something went wrong on the server (HTTP ${status}).`;
  }
}

async function readErrorBody(response) {
  try {
    const body = await response.json();
    // The API sends {"detail": "...", "code": "..."}; FastAPI's own validation errors send a list.
    if (typeof body.detail === "string") return { detail: body.detail, code: body.code || "" };
    if (Array.isArray(body.detail)) return { detail: body.detail.map((e) => e.msg).join("; "), code: body.code || "" };
  } catch (_) { /* not JSON: a proxy's HTML page, say */ }
  return { detail: "", code: "" };
}

function showError(title, detail = "", requestId = "", retryAfter = null) {
  stopCountdown();
  errorBox.replaceChildren();
  const strong = document.createElement("strong");
  strong.className = "error-title";
  strong.textContent = title;
  errorBox.append(strong);
  if (detail) {
    const p = document.createElement("p");
    p.className = "error-detail";
    p.textContent = detail;
    errorBox.append(p);
  }
  if (retryAfter) startCountdown(retryAfter);
  if (requestId) {
    const p = document.createElement("p");
    p.className = "error-id";
    p.textContent = `Request ID: ${requestId}`;
    errorBox.append(p);
  }
  errorBox.hidden = false;
}

function clearError() {
  stopCountdown();
  errorBox.hidden = true;
  errorBox.replaceChildren();
}

/** After a 429 or 503, count down Retry-After in a line of its own (not re-announced every second). */
function startCountdown(total) {
  const line = document.createElement("p");
  line.className = "countdown";
  line.setAttribute("aria-live", "off");
  errorBox.append(line);
  const until = Date.now() + total * 1000;
  const tick = () => {
    const left = Math.ceil((until - Date.now()) / 1000);
    if (left > 0) {
      line.textContent = `You can try again in ${seconds(left)}.`;
    } else {
      line.textContent = "You can try again now.";
      stopCountdown();
    }
  };
  tick();
  countdownTimer = setInterval(tick, 1000);
}

function stopCountdown() {
  if (countdownTimer !== null) clearInterval(countdownTimer);
  countdownTimer = null;
}

// ---- choosing a file -------------------------------------------------------------------------------

const formatBytes = (n) => (n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KB` : `${(n / 1048576).toFixed(1)} MB`);

function chooseFile(file) {
  if (!file) return;
  chosenFile = file;
  $("file-info").textContent = `${file.name} (${formatBytes(file.size)})`;
  restoreButton.disabled = false;
  clearError();
  statusLine.textContent = "Ready: press Restore.";
}

fileInput.addEventListener("change", () => chooseFile(fileInput.files[0]));

for (const type of ["dragenter", "dragover"]) {
  dropZone.addEventListener(type, (e) => {
    e.preventDefault();
    dropZone.classList.add("dragging");
  });
}
for (const type of ["dragleave", "drop"]) {
  dropZone.addEventListener(type, () => dropZone.classList.remove("dragging"));
}
dropZone.addEventListener("drop", (e) => {
  e.preventDefault();
  chooseFile(e.dataTransfer.files[0]);
});
// A file dropped beside the zone would make the browser navigate away from the page.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());
document.addEventListener("paste", (e) => {
  const file = e.clipboardData && e.clipboardData.files[0];
  if (file) chooseFile(file);
});

// ---- restoring -------------------------------------------------------------------------------------

function setBusy(busy) {
  restoreButton.disabled = busy || !chosenFile;
  cancelButton.hidden = !busy;
  form.setAttribute("aria-busy", String(busy));
}

function requestUrl(task) {
  const params = new URLSearchParams({ format: $("format").value });
  if ($("format").value !== "png") params.set("quality", $("quality").value);
  return `restore/${encodeURIComponent(task)}?${params}`;
}

form.addEventListener("submit", async (e) => {
  e.preventDefault();
  if (!chosenFile || inFlight) return;
  const task = new FormData(form).get("task");
  const body = new FormData();
  body.append("image", chosenFile, chosenFile.name);
  const headers = authHeaders();

  clearError();
  setBusy(true);
  inFlight = new AbortController();
  statusLine.textContent = `Restoring ${chosenFile.name} (${task})…`;
  const started = performance.now();
  try {
    const response = await fetch(requestUrl(task), { method: "POST", body, headers, signal: inFlight.signal });
    const requestId = response.headers.get("X-Request-ID") || "";
    if (!response.ok) {
      const retryAfter = parseRetryAfter(response.headers.get("Retry-After"));
      const { detail } = await readErrorBody(response);
      statusLine.textContent = "";
      showError(headline(response.status, retryAfter), detail, requestId, retryAfter);
      return;
    }
    const blob = await response.blob();
    const roundTrip = performance.now() - started;
    await showResult(blob, task, requestId, parseServerTiming(response.headers.get("Server-Timing")), roundTrip);
  } catch (err) {
    statusLine.textContent = "";
    if (err.name === "AbortError") statusLine.textContent = "Cancelled.";
    else showError("Could not reach the service. Check that it is running and try again.", String(err.message || err));
  } finally {
    inFlight = null;
    setBusy(false);
  }
});

cancelButton.addEventListener("click", () => inFlight && inFlight.abort());

function replaceUrl(which, blob) {
  if (objectUrls[which]) URL.revokeObjectURL(objectUrls[which]);
  objectUrls[which] = URL.createObjectURL(blob);
  return objectUrls[which];
}

/** Resolves once the image has decoded (or failed to: the browser may not show TIFF, say). */
function loadImage(img, url) {
  return new Promise((resolve) => {
    img.onload = () => resolve(true);
    img.onerror = () => resolve(false);
    img.src = url;
  });
}

const EXTENSIONS = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp" };

async function showResult(blob, task, requestId, timings, roundTrip) {
  const [beforeOk, afterOk] = await Promise.all([
    loadImage(beforeImg, replaceUrl("before", chosenFile)),
    loadImage(afterImg, replaceUrl("after", blob)),
  ]);
  if (!afterOk) {
    showError("The server answered, but this browser cannot show the result.", `Type: ${blob.type || "unknown"}`, requestId);
    statusLine.textContent = "";
    return;
  }
  compare.classList.toggle("no-before", !beforeOk);
  $("before-missing").hidden = beforeOk;

  const { naturalWidth: w, naturalHeight: h } = afterImg;
  $("fact-size").textContent = `${w} × ${h} px`;
  $("fact-result").textContent = `${(blob.type || "unknown").replace("image/", "").toUpperCase()}, ${formatBytes(blob.size)}`;
  $("fact-request-id").textContent = requestId || "–";
  renderTimings(timings, roundTrip);

  const stem = chosenFile.name.replace(/\.[^.]+$/, "") || "image";
  download.href = objectUrls.after;
  download.download = `${stem}-${task}.${EXTENSIONS[blob.type] || "img"}`;

  result.hidden = false;
  statusLine.textContent = `Done: ${chosenFile.name} restored (${task}) in ${Math.round(roundTrip)} ms.`;
}

function renderTimings(timings, roundTrip) {
  const tbody = $("timings").tBodies[0];
  const tfoot = $("timings").tFoot;
  tbody.replaceChildren();
  tfoot.replaceChildren();
  const known = timings.filter((t) => t.dur !== null);
  const total = known.reduce((sum, t) => sum + t.dur, 0);
  for (const t of known) {
    const row = tbody.insertRow();
    row.dataset.step = t.name;
    row.insertCell().textContent = t.desc || t.name;
    const ms = row.insertCell();
    ms.className = "num";
    ms.textContent = t.dur.toFixed(1);
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${total > 0 ? (100 * t.dur) / total : 0}%`;
    row.insertCell().append(bar);
  }
  if (!known.length) {
    const cell = tbody.insertRow().insertCell();
    cell.colSpan = 3;
    cell.textContent = "The server sent no timing breakdown.";
  }
  const addTotal = (label, value) => {
    const row = tfoot.insertRow();
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = label;
    row.append(th);
    const ms = row.insertCell();
    ms.className = "num";
    ms.textContent = value.toFixed(1);
    row.insertCell();
  };
  if (known.length) addTotal("Server total", total);
  addTotal("Round trip (this browser)", roundTrip);
}

// ---- the comparison ----------------------------------------------------------------------------

function setSplit(percent) {
  const p = Math.min(100, Math.max(0, Math.round(percent)));
  compare.style.setProperty("--split", `${p}%`);
  slider.value = String(p);
  slider.setAttribute("aria-valuetext", `${p}% before, ${100 - p}% after`);
}

slider.addEventListener("input", () => setSplit(Number(slider.value)));

// Dragging on the picture moves the divider too; the range input stays the keyboard control.
compare.addEventListener("pointerdown", (e) => {
  if (!compare.classList.contains("view-slider")) return;
  const move = (ev) => {
    const box = compare.getBoundingClientRect();
    setSplit((100 * (ev.clientX - box.left)) / box.width);
  };
  move(e);
  compare.setPointerCapture(e.pointerId);
  compare.addEventListener("pointermove", move);
  compare.addEventListener("pointerup", () => compare.removeEventListener("pointermove", move), { once: true });
});

for (const button of document.querySelectorAll(".view-toggle button")) {
  button.addEventListener("click", () => {
    const view = button.dataset.view;
    compare.classList.toggle("view-slider", view === "slider");
    compare.classList.toggle("view-side", view === "side");
    document.querySelector(".slider-row").hidden = view !== "slider";
    for (const b of document.querySelectorAll(".view-toggle button")) b.setAttribute("aria-pressed", String(b === button));
  });
}

// ---- what this server offers ----------------------------------------------------------------------

function authHeaders() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

/** Disables tasks this server does not serve, marks those still warming up, shows the size limits.
 *  A hint only: the page works without it (GET tasks needs the token when the server has one). */
async function showServerInfo() {
  let body;
  try {
    const response = await fetch("tasks", { headers: { Accept: "application/json", ...authHeaders() } });
    if (!response.ok) return;
    body = await response.json();
  } catch (_) {
    return;
  }
  const tasks = body && body.tasks;
  if (tasks && typeof tasks === "object" && !Array.isArray(tasks)) {
    const radios = [...form.querySelectorAll('input[name="task"]')];
    for (const radio of radios) {
      const info = tasks[radio.value];
      radio.disabled = !info;
      $(`state-${radio.value}`).textContent = !info ? "not on this server" : info.ready === false ? "warming up" : "";
    }
    const checked = radios.find((r) => r.checked);
    if (checked && checked.disabled) {
      const first = radios.find((r) => !r.disabled);
      if (first) first.checked = true;
    }
  }
  const limits = body && body.limits;
  if (limits && limits.max_upload_bytes && limits.max_pixels) {
    $("limits").textContent = ` Up to ${formatBytes(limits.max_upload_bytes)} and ${+(limits.max_pixels / 1e6).toFixed(1)} megapixels.`;
  }
}

$("token").addEventListener("change", showServerInfo);
setSplit(50);
showServerInfo();
