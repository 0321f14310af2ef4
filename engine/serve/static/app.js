// cxr review page: plain JS, no build step. Views are chosen by the URL hash:
//   #/images?q=..&sort=prob&desc=1&offset=50   #/case/KEY   #/query   #/summary
// Keys stay strings throughout (uint64 does not fit a JS number).
"use strict";

const $ = (id) => document.getElementById(id);
const VIEWS = ["images", "case", "query", "summary"];
const DEFAULT_SORT = { sort: "prob", desc: "1" };
let RUN = null;
// The server requires this on every POST: a page on another site cannot read it from ours.
const TOKEN = document.querySelector('meta[name="cxr-token"]')?.content || "";

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

async function api(path, options) {
  const response = await fetch(path, options);
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return response.json();
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

const fmtProb = (p) => (p === null || p === undefined ? "–" : p.toFixed(3));
const fmtPct = (f) => (f === null || f === undefined ? "–" : `${(100 * f).toFixed(1)}%`);

function decisionTag(row) {
  if (row.status && row.status !== "ok") return el("span", { class: "tag error", text: "error" });
  if (row.decision === null || row.decision === undefined) return el("span", { text: "–" });
  const word = row.decision ? "positive" : "negative";
  return el("span", { class: `tag ${word}`, text: word });
}

function thumb(key, cls = "thumb") {
  const img = el("img", { class: cls, src: `/api/thumb/${key}`, alt: "", loading: "lazy" });
  img.addEventListener("error", () => img.replaceWith(el("span", { class: "thumb-missing" })));
  return img;
}

// ---------------------------------------------------------------------------------- routing

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query] = raw.split("?");
  const parts = path.split("/").filter(Boolean);
  return { view: VIEWS.includes(parts[0]) ? parts[0] : "images", arg: parts[1], params: new URLSearchParams(query || "") };
}

function route() {
  const { view, arg, params } = parseHash();
  showError("");
  for (const v of VIEWS) $(`view-${v}`).hidden = v !== view;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.nav === view);
  if (view === "images") renderTable(params);
  else if (view === "case") renderCase(arg);
  else if (view === "summary") renderSummary();
  else if (view === "query") renderQuery();
}

// ------------------------------------------------------------------------------------ table

let tableState = new URLSearchParams();

function tableParams(params) {
  const p = new URLSearchParams(params);
  if (!p.has("sort")) { p.set("sort", DEFAULT_SORT.sort); p.set("desc", DEFAULT_SORT.desc); }
  if (!p.has("limit")) p.set("limit", "50");
  if (!p.has("offset")) p.set("offset", "0");
  return p;
}

function setTableHash(p) {
  for (const [k, v] of [...p.entries()]) if (v === "") p.delete(k);
  location.hash = `#/images?${p.toString()}`;
}

function syncForm(p) {
  $("f-q").value = p.get("q") || "";
  $("f-decision").value = p.get("decision") || "";
  $("f-status").value = p.get("status") || "";
  $("f-run").value = p.get("run") || "";
  $("f-prob-min").value = p.get("prob_min") || "";
  $("f-prob-max").value = p.get("prob_max") || "";
  $("f-limit").value = p.get("limit") || "50";
  for (const th of document.querySelectorAll("#table th[data-sort]")) {
    th.classList.remove("sorted-asc", "sorted-desc");
    if (th.dataset.sort === p.get("sort")) th.classList.add(p.get("desc") === "1" ? "sorted-desc" : "sorted-asc");
  }
}

function formChanged() {
  const p = new URLSearchParams(tableState);
  p.set("q", $("f-q").value.trim());
  p.set("decision", $("f-decision").value);
  p.set("status", $("f-status").value);
  p.set("run", $("f-run").value);
  p.set("prob_min", $("f-prob-min").value);
  p.set("prob_max", $("f-prob-max").value);
  p.set("limit", $("f-limit").value);
  p.set("offset", "0");
  setTableHash(p);
}

let tableRequest = 0;

async function renderTable(params) {
  const p = tableParams(params);
  tableState = p;
  syncForm(p);
  const mine = ++tableRequest;
  let page;
  try {
    page = await api(`/api/images?${p.toString()}`);
  } catch (e) {
    showError(`Cannot load the table: ${e.message}`);
    return;
  }
  if (mine !== tableRequest) return; // a newer request is on its way
  const body = $("rows");
  body.replaceChildren(...page.rows.map(tableRow));
  const first = page.total ? page.offset + 1 : 0;
  const last = page.offset + page.rows.length;
  $("page-info").textContent = `${first.toLocaleString()}–${last.toLocaleString()} of ${page.total.toLocaleString()} images`;
  $("prev").disabled = page.offset === 0;
  $("next").disabled = last >= page.total;
  $("table").dataset.total = String(page.total);
}

function tableRow(r) {
  const open = () => { location.hash = `#/case/${r.key}`; };
  const where = r.member ? r.source.split("/").pop() : r.source.split("/").slice(-2, -1)[0] || "";
  return el(
    "tr", { "data-key": r.key, onclick: open },
    el("td", {}, r.status === "ok" ? thumb(r.key) : el("span", { class: "thumb-missing" })),
    el("td", { title: r.member ? `${r.source} : ${r.member}` : r.source },
      el("a", { href: `#/case/${r.key}`, class: "name", text: r.name }),
      el("div", { class: "sub", text: r.status === "ok" ? where : (r.error || "") })),
    el("td", { class: "num prob", text: fmtProb(r.prob) }),
    el("td", {}, decisionTag(r)),
    el("td", { class: "status", text: r.status || "" }),
    el("td", { class: "num", text: fmtPct(r.lung_fraction) }),
    el("td", { class: "ids", text: r.patient_id || "", title: r.patient_id }),
    el("td", { class: "ids", text: r.study_uid || "", title: r.study_uid }),
    el("td", { class: "ids", text: r.sop_uid || "", title: r.sop_uid }),
  );
}

function setupTable() {
  let typing = null;
  $("filters").addEventListener("change", formChanged);
  $("filters").addEventListener("submit", (e) => { e.preventDefault(); formChanged(); });
  $("f-q").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(formChanged, 300); });
  $("f-reset").addEventListener("click", (e) => { e.preventDefault(); setTableHash(new URLSearchParams()); });
  for (const th of document.querySelectorAll("#table th[data-sort]")) {
    th.addEventListener("click", () => {
      const p = new URLSearchParams(tableState);
      const same = p.get("sort") === th.dataset.sort;
      p.set("desc", same ? (p.get("desc") === "1" ? "0" : "1") : (th.dataset.sort === "prob" ? "1" : "0"));
      p.set("sort", th.dataset.sort);
      p.set("offset", "0");
      setTableHash(p);
    });
  }
  const move = (sign) => {
    const p = new URLSearchParams(tableState);
    const limit = Number(p.get("limit"));
    p.set("offset", String(Math.max(0, Number(p.get("offset")) + sign * limit)));
    setTableHash(p);
  };
  $("prev").addEventListener("click", () => move(-1));
  $("next").addEventListener("click", () => move(1));
}

// ------------------------------------------------------------------------------------- case

const viewer = { w: 1, h: 1, zoom: 1 };

function applyZoom(z, anchor) {
  const box = $("viewer");
  const old = viewer.zoom;
  viewer.zoom = Math.min(16, Math.max(0.02, z));
  const stage = $("stage");
  // keep the point under the anchor (or the centre) where it was
  const ax = anchor ? anchor.x : box.clientWidth / 2;
  const ay = anchor ? anchor.y : box.clientHeight / 2;
  const fx = (box.scrollLeft + ax) / old;
  const fy = (box.scrollTop + ay) / old;
  stage.style.width = `${Math.round(viewer.w * viewer.zoom)}px`;
  stage.style.height = `${Math.round(viewer.h * viewer.zoom)}px`;
  box.scrollLeft = fx * viewer.zoom - ax;
  box.scrollTop = fy * viewer.zoom - ay;
  $("zoom-level").textContent = `${Math.round(viewer.zoom * 100)}%`;
}

function fitZoom() {
  const box = $("viewer");
  applyZoom(Math.min(box.clientWidth / viewer.w, box.clientHeight / viewer.h));
}

function setupViewer() {
  const box = $("viewer");
  $("zoom-fit").addEventListener("click", fitZoom);
  $("zoom-1").addEventListener("click", () => applyZoom(1));
  $("zoom-in").addEventListener("click", () => applyZoom(viewer.zoom * 1.25));
  $("zoom-out").addEventListener("click", () => applyZoom(viewer.zoom / 1.25));
  box.addEventListener("wheel", (e) => {
    if (!e.ctrlKey && !e.metaKey && !e.altKey) return; // plain wheel scrolls
    e.preventDefault();
    const r = box.getBoundingClientRect();
    applyZoom(viewer.zoom * (e.deltaY < 0 ? 1.15 : 1 / 1.15), { x: e.clientX - r.left, y: e.clientY - r.top });
  }, { passive: false });
  let drag = null;
  box.addEventListener("mousedown", (e) => {
    drag = { x: e.clientX, y: e.clientY, l: box.scrollLeft, t: box.scrollTop };
    box.classList.add("dragging");
    e.preventDefault();
  });
  window.addEventListener("mousemove", (e) => {
    if (!drag) return;
    box.scrollLeft = drag.l - (e.clientX - drag.x);
    box.scrollTop = drag.t - (e.clientY - drag.y);
  });
  window.addEventListener("mouseup", () => { drag = null; box.classList.remove("dragging"); });
  $("show-mask").addEventListener("change", () => { $("case-mask").hidden = !$("show-mask").checked || !$("case-mask").dataset.ok; });
  $("show-box").addEventListener("change", () => { $("case-box").hidden = !$("show-box").checked || !$("case-box").dataset.ok; });
}

async function renderCase(key) {
  let row;
  try {
    row = await api(`/api/case/${encodeURIComponent(key || "")}`);
  } catch (e) {
    showError(`Cannot open case ${key}: ${e.message}`);
    return;
  }
  $("view-case").dataset.key = row.key;
  $("case-title").textContent = row.member ? `${row.name}` : row.name;
  $("case-prob").textContent = row.status === "ok" ? `p = ${fmtProb(row.prob)}` : "not screened";
  $("case-decision").replaceWith(Object.assign(decisionTag(row), { id: "case-decision" }));
  const facts = [
    ["key", row.key], ["source", row.source], ["member", row.member], ["status", row.status],
    ["error", row.error], ["threshold", row.threshold === null ? null : fmtProb(row.threshold)],
    ["lung fraction", row.lung_fraction === null ? null : fmtPct(row.lung_fraction)],
    ["lung box", row.lung_bbox ? row.lung_bbox.join(", ") : null],
    ["size", row.width ? `${row.width} × ${row.height}, ${row.bit_depth}-bit ${row.format}` : null],
    ["patient", row.patient_id], ["study", row.study_uid], ["SOP instance", row.sop_uid],
    ["view", row.view_position], ["modality", row.modality], ["sha256", row.sha256],
    ["screened", row.screened_at],
  ];
  $("case-facts").replaceChildren(...facts.filter(([, v]) => v !== null && v !== undefined && v !== "")
    .flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v) })]));

  viewer.w = row.width || 512;
  viewer.h = row.height || 512;
  const image = $("case-image");
  const mask = $("case-mask");
  const box = $("case-box");
  const noimage = $("case-noimage");
  image.removeAttribute("src");
  image.dataset.loaded = "";
  mask.dataset.ok = "";
  box.dataset.ok = "";
  mask.hidden = true;
  box.hidden = true;
  noimage.hidden = true;
  // what the run refused (unreadable, a bomb, too small) is not fetched: the server refuses it
  $("stage").hidden = row.status !== "ok";
  if (row.status !== "ok") {
    noimage.textContent = `No image: the engine could not screen this file${row.error ? `: ${row.error}` : "."}`;
    noimage.hidden = false;
  } else {
    image.src = `/api/thumb/${row.key}`; // at once, then the full image
    const full = new Image();
    full.onload = () => { image.src = full.src; image.dataset.loaded = "full"; };
    full.onerror = async () => {
      let why = "";
      try { await api(`/api/image/${row.key}`); } catch (e) { why = e.message; }
      noimage.textContent = `The full image cannot be shown: ${why}`;
      noimage.hidden = false;
    };
    full.src = `/api/image/${row.key}`;
    requestAnimationFrame(fitZoom);
  }
  if (row.status === "ok") {
    mask.onload = () => { mask.dataset.ok = "1"; mask.hidden = !$("show-mask").checked; };
    mask.src = `/api/mask/${row.key}?overlay=true`;
    if (row.lung_bbox && row.width && row.height) {
      const [x0, y0, x1, y1] = row.lung_bbox;
      Object.assign(box.style, {
        left: `${(100 * x0) / row.width}%`, top: `${(100 * y0) / row.height}%`,
        width: `${(100 * (x1 - x0)) / row.width}%`, height: `${(100 * (y1 - y0)) / row.height}%`,
      });
      box.dataset.ok = "1";
      box.hidden = !$("show-box").checked;
    }
  } else {
    mask.removeAttribute("src");
  }
  const similar = $("similar");
  similar.replaceChildren(el("p", { class: "muted", text: row.status === "ok" ? "searching…" : "no embedding: the image was not screened" }));
  if (row.status !== "ok") return;
  try {
    const result = await api(`/api/similar/${row.key}?k=8`);
    if ($("view-case").dataset.key !== row.key) return; // the user moved on
    similar.replaceChildren(...result.neighbours.map(similarCard));
  } catch (e) {
    similar.replaceChildren(el("p", { class: "muted", text: `no similar cases: ${e.message}` }));
  }
}

function similarCard(n) {
  return el("a", { class: "card similar-case", href: `#/case/${n.key}`, "data-key": n.key, title: n.member ? `${n.source} : ${n.member}` : n.source },
    thumb(n.key, ""),
    el("div", { class: "name", text: n.name }),
    el("div", { text: `sim ${n.similarity.toFixed(3)}` }),
    el("div", {}, `p ${fmtProb(n.prob)} `, decisionTag(n)));
}

// ------------------------------------------------------------------------------------ query

function renderQuery() {
  if (RUN) {
    $("upload-limit").textContent = `up to ${Math.round(RUN.max_upload_bytes / 2 ** 20)} MB`;
  }
}

async function runQuery(request, label) {
  $("query-status").textContent = `running ${label} through the pipeline…`;
  $("query-similar").replaceChildren();
  try {
    const result = await request();
    $("query-status").textContent = `${result.neighbours.length} most similar screened cases to ${label}`;
    $("query-similar").replaceChildren(...result.neighbours.map(similarCard));
  } catch (e) {
    $("query-status").textContent = `Failed: ${e.message}`;
  }
}

function setupQuery() {
  $("upload").addEventListener("submit", (e) => {
    e.preventDefault();
    const file = $("query-file").files[0];
    if (!file) { $("query-status").textContent = "choose an image file first"; return; }
    const preview = $("query-preview");
    preview.hidden = !/^image\/(png|jpeg)$/.test(file.type);
    if (!preview.hidden) preview.src = URL.createObjectURL(file);
    const headers = { "Content-Type": "application/octet-stream", "X-CXR-Token": TOKEN };
    runQuery(() => api("/api/query?k=12", { method: "POST", body: file, headers }), file.name);
  });
}

// ---------------------------------------------------------------------------------- summary

async function renderSummary() {
  let s;
  try {
    s = await api("/api/summary");
  } catch (e) {
    showError(`Cannot load the summary: ${e.message}`);
    return;
  }
  const c = s.counts;
  const card = (label, n, extra) => el("div", { class: "count", "data-count": label }, el("b", { text: n.toLocaleString() }), label, extra ? el("div", { class: "muted", text: extra }) : null);
  $("counts").replaceChildren(
    card("images", c.total),
    card("ok", c.ok),
    card("error", c.error),
    card("positive", c.positive, c.ok ? `${((100 * c.positive) / c.ok).toFixed(1)}% of ok` : null),
    card("negative", c.negative),
  );
  $("histogram").replaceChildren(histogramSvg(s.histogram, s.run.threshold));
  const report = $("report");
  report.replaceChildren();
  if (!s.report) {
    report.append(el("p", { class: "muted", text: "No evaluation report: run `cxr evaluate OUT_DIR --labels labels.csv --report OUT_DIR/report` (or pass --report DIR to cxr serve) to see ROC and PR curves here." }));
    return;
  }
  report.className = "report";
  const names = { accuracy: "accuracy", sensitivity: "sensitivity", specificity: "specificity", ppv: "PPV", npv: "NPV", f1: "F1", roc_auc: "ROC AUC", pr_auc: "PR AUC", ece: "ECE" };
  const fmtCi = (m) => (m && m.ci95 ? `${m.ci95.low?.toFixed?.(3) ?? "–"} – ${m.ci95.high?.toFixed?.(3) ?? "–"}` : "");
  const metrics = s.report.overall.metrics || {};
  report.append(
    el("h3", { text: "Evaluation against labels" }),
    el("table", { id: "metrics" },
      el("tr", {}, el("th", { text: "metric" }), el("th", { text: "value" }), el("th", { text: "95% CI" })),
      ...Object.entries(names).filter(([k]) => k in metrics).map(([k, label]) =>
        el("tr", {}, el("td", { text: label }), el("td", { text: metrics[k].value === null ? "–" : metrics[k].value.toFixed(3) }), el("td", { text: fmtCi(metrics[k]) })))),
    el("div", {}, ...s.report.plots.map((n) => el("img", { src: `/api/report/${n}`, alt: n, class: "plot" }))),
    s.report.html ? el("p", {}, el("a", { href: "/api/report/report.html", target: "_blank", rel: "noopener", text: "full report (report.html)" })) : null,
    ...(s.report.caveats || []).map((t) => el("p", { class: "muted", text: `caveat: ${t}` })),
  );
}

function histogramSvg(hist, threshold) {
  const NS = "http://www.w3.org/2000/svg";
  const svg = (tag, attrs = {}) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    return n;
  };
  const W = 640, H = 220, L = 44, B = 26, T = 10, R = 10;
  const max = Math.max(1, ...hist.counts);
  const root = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, id: "histogram-svg" });
  const x = (p) => L + p * (W - L - R);
  const y = (n) => H - B - (n / max) * (H - B - T);
  hist.counts.forEach((n, i) => {
    const x0 = x(hist.edges[i]), x1 = x(hist.edges[i + 1]);
    const bar = svg("rect", { class: "bar", x: x0 + 1, y: y(n), width: Math.max(1, x1 - x0 - 2), height: H - B - y(n), "data-count": n });
    const title = svg("title");
    title.textContent = `${hist.edges[i].toFixed(2)}–${hist.edges[i + 1].toFixed(2)}: ${n}`;
    bar.append(title);
    root.append(bar);
  });
  root.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999" }));
  for (const p of [0, 0.25, 0.5, 0.75, 1]) {
    const t = svg("text", { x: x(p), y: H - 8, "text-anchor": "middle" });
    t.textContent = p.toFixed(2);
    root.append(t);
  }
  for (const n of [0, max]) {
    const t = svg("text", { x: L - 6, y: y(n) + 4, "text-anchor": "end" });
    t.textContent = String(n);
    root.append(t);
  }
  if (threshold !== null && threshold !== undefined) {
    root.append(svg("line", { class: "threshold", x1: x(threshold), x2: x(threshold), y1: T, y2: H - B }));
  }
  return root;
}

// ------------------------------------------------------------------------------------- start

async function start() {
  setupTable();
  setupViewer();
  setupQuery();
  window.addEventListener("hashchange", route);
  window.addEventListener("resize", () => { if (!$("view-case").hidden) fitZoom(); });
  try {
    RUN = await api("/api/run");
    $("untrained").hidden = RUN.trained;
    $("run-info").textContent = `${RUN.out} · models ${RUN.model_id || "?"} · ${RUN.backend || ""}`;
  } catch (e) {
    showError(`Cannot read the run: ${e.message}`);
  }
  try {
    const { runs } = await api("/api/runs");
    $("f-run").append(...runs.map((r) => el("option", {
      value: r.run_id,
      text: `${(r.started_at || "").slice(0, 16).replace("T", " ")} · ${r.run_id} · ${r.images.new ?? "?"} new`,
    })));
  } catch (e) {
    // the table works without the list of runs
  }
  route();
}

document.addEventListener("DOMContentLoaded", start);
