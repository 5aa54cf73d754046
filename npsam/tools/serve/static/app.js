// npsam serve: the page. Plain JavaScript, no build step, nothing fetched
// but this server's /api and /static. State lives on the server, per tab
// (a session made when the page loads); every action answers with the
// tab's view of the photo, which render() draws.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const DRAG_PX = 5; // a press that moves further than this (screen pixels) draws a box

const app = {
  session: null,
  photo: null, // {id, name, width, height}
  view: null, // the server's view of this tab on the photo
  ready: false,
  config: null,
  timings: [], // click-to-mask times, ms (pointer released -> mask decoded and shown)
  explainSerial: 0,
};
window.npsam = app; // for tests and the curious

// ---------------------------------------------------------------------------
// Talking to the server
// ---------------------------------------------------------------------------
async function api(method, path, body, headers) {
  const init = { method, headers: headers || {} };
  if (body instanceof Blob) {
    init.body = body;
  } else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  const type = response.headers.get("Content-Type") || "";
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    if (type.includes("json")) message = (await response.json()).error || message;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return type.includes("json") ? response.json() : response.blob();
}

const tabPath = (suffix) => `/api/sessions/${app.session}/photos/${app.photo.id}${suffix || ""}`;

let errorTimer = null;
function showError(error) {
  const box = $("error");
  box.textContent = String(error.message || error);
  box.hidden = false;
  clearTimeout(errorTimer);
  errorTimer = setTimeout(() => { box.hidden = true; }, 8000);
}

async function guarded(fn) {
  try { return await fn(); } catch (error) { showError(error); return null; }
}

function progress(fraction, text) {
  $("progress").hidden = fraction === null;
  if (fraction === null) return;
  $("progress-bar").style.width = `${Math.round(100 * Math.min(Math.max(fraction, 0), 1))}%`;
  $("progress-text").textContent = text;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---------------------------------------------------------------------------
// Photos
// ---------------------------------------------------------------------------
async function listPhotos(selectId) {
  const { photos } = await api("GET", "/api/photos");
  const select = $("photo-select");
  select.textContent = "";
  const none = new Option(photos.length ? "choose a photo…" : "no photos: upload one", "");
  select.add(none);
  for (const p of photos) select.add(new Option(`${p.name} (${p.width}×${p.height})`, p.id));
  app.photos = photos;
  if (selectId) select.value = selectId;
}

async function openPhoto(id) {
  const photo = (app.photos || []).find((p) => p.id === id);
  if (!photo) return;
  app.photo = photo;
  app.view = null;
  $("photo").src = `/api/photos/${id}/image`;
  $("marks").setAttribute("viewBox", `0 0 ${photo.width} ${photo.height}`);
  $("stage").classList.remove("empty");
  await embed(photo);
  if (!app.photo || app.photo.id !== id) return;
  app.view = await api("GET", tabPath());
  setReady();
}

function setReady() {
  app.ready = true;
  $("stage").classList.remove("busy");
  render();
}

// Compute (or find) the photo's embedding, showing progress; clicks wait until setReady().
async function embed(photo) {
  const id = photo.id;
  app.ready = false;
  $("stage").classList.add("busy");
  render();
  let status = await api("POST", `/api/photos/${id}/embed`);
  while (app.photo && app.photo.id === id) {
    const e = status.embedding;
    if (e.state === "ready") break;
    if (e.state === "error") throw new Error(`embedding ${photo.name} failed: ${e.error}`);
    if (e.state === "absent") status = await api("POST", `/api/photos/${id}/embed`); // dropped from the cache
    progress(e.total ? e.done / e.total : 0, `embedding ${e.done}/${e.total || "…"} ${e.seconds.toFixed(1)} s`);
    await sleep(200);
    status = await api("GET", `/api/photos/${id}`);
  }
  if (app.photo && app.photo.id === id) progress(null);
}

async function upload(file) {
  if (app.config && file.size > app.config.max_upload_bytes) {
    throw new Error(`${file.name} is ${file.size.toLocaleString()} bytes; the limit is ${app.config.max_upload_bytes.toLocaleString()}`);
  }
  progress(0, `uploading ${file.name}`);
  try {
    const photo = await api("POST", "/api/photos", file, { "X-Filename": encodeURIComponent(file.name) });
    await listPhotos(photo.id);
    await openPhoto(photo.id);
  } finally {
    if (!app.photo || app.ready) progress(null);
  }
}

// ---------------------------------------------------------------------------
// Prompts
// ---------------------------------------------------------------------------
function photoPoint(event) {
  const rect = $("marks").getBoundingClientRect();
  const x = ((event.clientX - rect.left) * app.photo.width) / rect.width;
  const y = ((event.clientY - rect.top) * app.photo.height) / rect.height;
  const clamp = (v, hi) => Math.round(Math.min(Math.max(v, 0), hi) * 100) / 100;
  return [clamp(x, app.photo.width), clamp(y, app.photo.height)];
}

let press = null; // {x, y (screen), point (photo), label}

function onPointerDown(event) {
  if (!app.ready || (event.button !== 0 && event.button !== 2)) return;
  event.preventDefault();
  $("marks").setPointerCapture(event.pointerId);
  const background = event.button === 2 || event.shiftKey;
  press = { x: event.clientX, y: event.clientY, point: photoPoint(event), label: background ? 0 : 1 };
}

function onPointerMove(event) {
  if (!press) return;
  if (Math.hypot(event.clientX - press.x, event.clientY - press.y) > DRAG_PX) {
    const [x1, y1] = photoPoint(event);
    drawBox(boxOf(press.point, [x1, y1]), true);
  }
}

function boxOf(a, b) {
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
}

async function onPointerUp(event) {
  if (!press) return;
  const start = performance.now();
  const p = press;
  press = null;
  const dragged = Math.hypot(event.clientX - p.x, event.clientY - p.y) > DRAG_PX;
  const body = dragged ? { box: boxOf(p.point, photoPoint(event)) } : { point: [p.point[0], p.point[1], p.label] };
  await guarded(() => prompt(body, start));
}

// Actions on the tab's state go one after the other, in the order they were made
// (a quick second click waits for the first answer, never overtakes it).
let chain = Promise.resolve();
function serial(fn) {
  const run = chain.then(fn);
  chain = run.catch(() => {});
  return run;
}

function prompt(body, start) {
  return serial(() => promptNow(body, start));
}

async function promptNow(body, start) {
  let view;
  try {
    view = await api("POST", tabPath("/prompt"), body);
  } catch (error) {
    if (error.status !== 409) throw error;
    // the embedding was dropped from the server's cache (other photos used since): again
    await embed(app.photo);
    setReady();
    view = await api("POST", tabPath("/prompt"), body);
  }
  app.view = view;
  await render();
  const ms = performance.now() - (start === undefined ? performance.now() : start);
  app.timings.push(ms);
  $("timing").textContent = `mask in ${Math.round(ms)} ms`;
  if ($("explain-toggle").checked) explain();
  return view;
}

function action(name, body) {
  return serial(async () => {
    app.view = await api("POST", tabPath(`/${name}`), body);
    await render();
    if ($("explain-toggle").checked) explain();
  });
}

// ---------------------------------------------------------------------------
// Drawing
// ---------------------------------------------------------------------------
function drawBox(box, temporary) {
  const marks = $("marks");
  let rect = marks.querySelector(temporary ? "rect.drag" : "rect.box");
  if (!rect) {
    rect = document.createElementNS(SVG, "rect");
    rect.setAttribute("class", temporary ? "drag" : "box");
    marks.appendChild(rect);
  }
  const stroke = Math.max(2, app.photo.width / 400);
  rect.setAttribute("x", box[0]); rect.setAttribute("y", box[1]);
  rect.setAttribute("width", box[2] - box[0]); rect.setAttribute("height", box[3] - box[1]);
  rect.setAttribute("fill", "none");
  rect.setAttribute("stroke", temporary ? "#ffd400" : "#00a000");
  rect.setAttribute("stroke-width", stroke);
  if (temporary) rect.setAttribute("stroke-dasharray", `${4 * stroke} ${2 * stroke}`);
}

function drawMarks(view) {
  const marks = $("marks");
  marks.textContent = "";
  if (!view) return;
  if (view.box) drawBox(view.box, false);
  // NOTE(reference): the notebooks' show_points: green stars for label 1, red for 0, white edges.
  const r = Math.max(5, Math.max(app.photo.width, app.photo.height) / 150);
  for (const [x, y, label] of view.points) {
    const c = document.createElementNS(SVG, "circle");
    c.setAttribute("cx", x); c.setAttribute("cy", y); c.setAttribute("r", r);
    c.setAttribute("fill", label === 1 ? "#00a000" : "#e00000");
    c.setAttribute("stroke", "#fff"); c.setAttribute("stroke-width", r / 3);
    c.setAttribute("class", label === 1 ? "point fg" : "point bg");
    marks.appendChild(c);
  }
}

async function render() {
  const view = app.view;
  const ready = app.ready && view;
  drawMarks(view);
  const mask = $("mask-layer");
  const chosen = view && view.chosen !== null ? view.candidates[view.chosen] : null;
  if (chosen) {
    mask.src = chosen.png;
    mask.hidden = false;
    try { await mask.decode(); } catch (e) { /* shown when it loads */ }
  } else {
    mask.hidden = true;
    mask.removeAttribute("src");
  }
  // the three candidates
  const box = $("candidates");
  box.textContent = "";
  (view ? view.candidates : []).forEach((c, i) => {
    const b = document.createElement("button");
    b.className = "candidate" + (i === view.chosen ? " chosen" : "");
    b.title = `candidate ${i + 1}: predicted IoU ${c.score.toFixed(3)}`;
    b.append(thumb(c.png));
    const s = document.createElement("div");
    s.className = "score";
    s.textContent = `#${i + 1} IoU ${c.score.toFixed(3)}`;
    b.append(s);
    b.onclick = () => guarded(() => action("pick", { index: i }));
    box.append(b);
  });
  // kept objects
  const layers = $("kept-layers");
  const list = $("kept");
  layers.textContent = "";
  list.textContent = "";
  for (const k of view ? view.kept : []) {
    const img = document.createElement("img");
    img.src = k.png;
    layers.append(img);
    const li = document.createElement("li");
    li.innerHTML = "<span class=swatch></span><span class=name></span><span class=area></span><button title='forget'>×</button>";
    li.querySelector(".name").textContent = k.label;
    li.querySelector(".swatch").style.background = k.color;
    li.querySelector(".area").textContent = `${k.area.toLocaleString()} px`;
    li.querySelector("button").onclick = () => guarded(() => serial(async () => {
      app.view = await api("DELETE", tabPath(`/objects/${k.id}`));
      render();
    }));
    list.append(li);
  }
  // everything
  const every = $("everything-layer");
  if (view && view.everything) {
    if (every.getAttribute("src") !== view.everything.png) every.src = view.everything.png;
    every.hidden = !$("show-everything").checked;
    $("everything-row").hidden = false;
    $("everything-count").textContent = `${view.everything.count} masks`;
  } else {
    every.hidden = true;
    $("everything-row").hidden = true;
  }
  $("undo").disabled = !(ready && view.can_undo);
  $("redo").disabled = !(ready && view.can_redo);
  $("clear").disabled = !(ready && (view.points.length || view.box));
  $("keep").disabled = !(ready && chosen);
  $("everything").disabled = !ready;
  $("export-mask").disabled = !(ready && chosen);
  $("export-coco").disabled = !(ready && view.kept.length);
  if (!chosen) $("explain-grid").textContent = "";
}

function thumb(overlay, heat, extent) {
  const t = document.createElement("div");
  t.className = "thumb";
  const base = document.createElement("img");
  base.src = $("photo").src;
  t.append(base);
  if (overlay) {
    const o = document.createElement("img");
    o.className = "over";
    o.src = overlay;
    t.append(o);
  }
  if (heat) {
    const h = document.createElement("img");
    h.className = "heat";
    h.src = heat;
    // the heat map's cells cover extent (photo pixels), reaching past the photo's edge
    h.style.width = `${(100 * extent[0]) / app.photo.width}%`;
    h.style.height = `${(100 * extent[1]) / app.photo.height}%`;
    t.append(h);
  }
  return t;
}

// ---------------------------------------------------------------------------
// What SAM looks at
// ---------------------------------------------------------------------------
async function explain() {
  const serial = ++app.explainSerial;
  const section = $("explain");
  section.hidden = false;
  const grid = $("explain-grid");
  if (!app.view || app.view.chosen === null) { grid.textContent = "Click on the photo first."; return; }
  const result = await guarded(() => api("POST", tabPath("/explain")));
  if (!result || serial !== app.explainSerial) return;
  const e = result.explain;
  grid.textContent = "";
  grid.style.gridTemplateColumns = `170px repeat(${e.tokens.length}, minmax(80px, 1fr))`;
  grid.append(cell("", "head"));
  e.tokens.forEach((name) => grid.append(cell(name, "head")));
  for (const layer of e.layers) {
    grid.append(cell(layer.name, "rowname"));
    layer.maps.forEach((map) => grid.append(thumb(null, map, e.extent)));
  }
  grid.append(cell("candidates (predicted IoU)", "rowname"));
  grid.append(cell("", ""), cell("", ""));
  app.view.candidates.forEach((c, i) => {
    const d = document.createElement("div");
    d.append(thumb(c.png));
    d.append(cell(`#${i + 1} IoU ${c.score.toFixed(3)}${i === app.view.chosen ? " (shown)" : ""}`, "rowname"));
    grid.append(d);
  });
}

function cell(text, cls) {
  const d = document.createElement("div");
  d.className = cls;
  d.textContent = text;
  return d;
}

// ---------------------------------------------------------------------------
// Everything, exports
// ---------------------------------------------------------------------------
async function everything() {
  const side = parseInt($("pps").value, 10);
  const photo = app.photo;
  let job = await api("POST", tabPath("/everything"), { points_per_side: side });
  $("everything").disabled = true;
  while (job.state === "queued" || job.state === "running") {
    progress(job.total ? job.done / job.total : 0, `everything: batch ${job.done}/${job.total || "…"}`);
    await sleep(250);
    job = await api("GET", `/api/sessions/${app.session}/jobs/${job.id}`);
  }
  progress(null);
  if (job.state === "error") throw new Error(`everything failed: ${job.error}`);
  if (app.photo !== photo) return;
  $("show-everything").checked = true;
  app.view = await api("GET", tabPath());
  render();
}

async function download(path, filename) {
  const response = await fetch(tabPath(path));
  if (!response.ok) {
    const type = response.headers.get("Content-Type") || "";
    throw new Error(type.includes("json") ? (await response.json()).error : `${response.status} ${response.statusText}`);
  }
  const blob = await response.blob();
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

const stem = () => app.photo.name.replace(/\.[^.]*$/, "").replace(/[^\w.-]/g, "_");

// ---------------------------------------------------------------------------
// Wiring
// ---------------------------------------------------------------------------
async function main() {
  const marks = $("marks");
  marks.addEventListener("pointerdown", onPointerDown);
  marks.addEventListener("pointermove", onPointerMove);
  marks.addEventListener("pointerup", onPointerUp);
  marks.addEventListener("contextmenu", (e) => e.preventDefault());
  $("photo-select").onchange = (e) => guarded(() => openPhoto(e.target.value));
  $("upload").onchange = (e) => { if (e.target.files[0]) guarded(() => upload(e.target.files[0])); e.target.value = ""; };
  $("undo").onclick = () => guarded(() => action("undo"));
  $("redo").onclick = () => guarded(() => action("redo"));
  $("clear").onclick = () => guarded(() => action("clear"));
  $("keep").onclick = () => guarded(() => action("keep", { label: $("label").value }));
  $("everything").onclick = () => guarded(everything);
  $("show-everything").onchange = () => render();
  $("keep-everything").onclick = () => guarded(() => action("everything/keep", { label: "everything" }));
  $("export-mask").onclick = () => guarded(() => download("/mask.png", `${stem()}_mask.png`));
  $("export-coco").onclick = () => guarded(() => download("/objects.json", `${stem()}_objects.json`));
  $("explain-toggle").onchange = (e) => {
    if (e.target.checked) explain(); else $("explain").hidden = true;
  };
  document.addEventListener("keydown", (e) => {
    if (!app.ready || e.target.tagName === "INPUT") return;
    if ((e.ctrlKey || e.metaKey) && e.key === "z" && !$("undo").disabled) guarded(() => action("undo"));
    if ((e.ctrlKey || e.metaKey) && e.key === "y" && !$("redo").disabled) guarded(() => action("redo"));
  });
  app.config = await api("GET", "/api/config");
  $("pps").value = app.config.points_per_side;
  $("pps").max = app.config.everything_max_side;
  app.session = (await api("POST", "/api/sessions")).session;
  await listPhotos();
  render();
  document.body.dataset.ready = "1";
  if (app.photos.length === 1) { // npsam serve PHOTO: open it at once
    $("photo-select").value = app.photos[0].id;
    await openPhoto(app.photos[0].id);
  }
}

guarded(main);
