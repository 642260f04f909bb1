// The search page of `vsl serve`: calls /api/search and renders the results. No framework, no build.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  form: $("search-form"), q: $("q"), k: $("k"), shortlist: $("shortlist"), go: $("go"),
  status: $("status"), error: $("error"), results: $("results"), empty: $("empty"),
  queryImage: $("query-image"), gallery: $("gallery"), examples: $("examples"), home: $("home"),
};
let info = null;
let pending = null;   // AbortController of the request in flight

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// Words not worth highlighting: they occur in nearly every caption.
const STOPWORDS = new Set(["a", "an", "the", "of", "on", "in", "is", "are", "with", "and", "to", "at", "this", "there", "it"]);

// The query's words, lower case, for highlighting (the model's tokenizer is word-based too).
function queryWords(text) {
  return new Set((text.toLowerCase().match(/[\p{L}\p{N}']+/gu) || []).filter((w) => !STOPWORDS.has(w)));
}

// A caption as text nodes with the query's words in <mark> (built as DOM nodes: never innerHTML).
function highlighted(caption, words) {
  const span = el("span");
  for (const part of caption.split(/([\p{L}\p{N}']+)/u)) {
    if (part && words.has(part.toLowerCase())) span.append(el("mark", {}, part));
    else if (part) span.append(part);
  }
  return span;
}

function thumbnail(url, label) {
  const box = el("div", { class: "thumb" });
  if (url) {
    const img = el("img", { src: url, alt: label, loading: "lazy" });
    img.addEventListener("error", () => img.replaceWith(label));
    box.append(img);
  } else {
    box.append(label);
  }
  return box;
}

// One colour per explained word (distinct on photos and on the demo's flat scenes).
const WORD_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#0aa5b8", "#f032e6", "#9a6324"];
const EXPLAINED_REGIONS = 2;   // regions drawn per word: the ones its attention weighs most
const SVG_NS = "http://www.w3.org/2000/svg";

// The regions each query word attends to (hit.explain: words, boxes, attention, image_size), drawn
// over the thumbnail: an SVG whose viewBox is the image's pixels, sliced as the <img> is covered.
function explanation(hit, thumb) {
  const ex = hit.explain;
  const [width, height] = ex.image_size;
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("class", "boxes");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "xMidYMid meet");   // as the <img> is contained
  const chips = [];
  let colour = 0;
  ex.words.forEach((word, w) => {
    if (STOPWORDS.has(word.toLowerCase()) || !/[\p{L}\p{N}]/u.test(word)) return;
    const c = WORD_COLOURS[colour++ % WORD_COLOURS.length];
    const order = ex.attention[w].map((a, r) => [a, r]).sort((x, y) => y[0] - x[0]).slice(0, EXPLAINED_REGIONS);
    for (const [weight, r] of order) {
      const [x1, y1, x2, y2] = ex.boxes[r];
      const rect = document.createElementNS(SVG_NS, "rect");
      for (const [k, v] of Object.entries({ x: x1, y: y1, width: Math.max(1, x2 - x1), height: Math.max(1, y2 - y1),
                                            stroke: c, "data-word": w, "vector-effect": "non-scaling-stroke" })) {
        rect.setAttribute(k, String(v));
      }
      const title = document.createElementNS(SVG_NS, "title");
      title.textContent = `${word}: region ${r}, attention ${weight.toFixed(2)}`;
      rect.append(title);
      svg.append(rect);
    }
    const focus = (on) => {
      svg.classList.toggle("focus", on);
      for (const rect of svg.querySelectorAll(`rect[data-word="${w}"]`)) rect.classList.toggle("on", on);
    };
    chips.push(el("span", { class: "word", style: `--c: ${c}`, tabindex: "0", "data-word": w,
                            title: `the ${EXPLAINED_REGIONS} regions “${word}” attends to most`,
                            onmouseenter: () => focus(true), onmouseleave: () => focus(false),
                            onfocus: () => focus(true), onblur: () => focus(false),
                            onclick: (e) => e.stopPropagation() }, word));
  });
  thumb.append(svg);
  return el("div", { class: "explain", title: "the regions each word of the query attends to in the exact model" }, ...chips);
}

const fmt = (x) => (typeof x === "number" ? x.toFixed(3) : "–");
const ms = (s) => (s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`);

function showError(message) {
  els.error.textContent = message;
  els.error.hidden = false;
}

function clearView() {
  els.error.hidden = true;
  els.results.replaceChildren();
  els.queryImage.hidden = true;
  els.queryImage.replaceChildren();
}

function showLoading() {
  els.empty.hidden = true;
  els.results.className = "results";
  els.results.replaceChildren(...Array.from({ length: 4 }, () => el("div", { class: "skeleton" })));
}

function shortlistText(body) {
  return body.shortlist === 0 ? "exhaustive exact scoring" : `shortlist ${body.shortlist}, exact re-ranking`;
}

function renderImages(body, words) {
  els.results.className = "results";
  els.results.replaceChildren(...body.results.map((hit) => {
    const open = () => run({ image_id: hit.id });
    // An <article> acting as a button (a <button> may not hold the caption list).
    const card = el("article", { class: "card", role: "button", tabindex: "0", "data-id": hit.id,
                                 title: `Find the captions that best describe image ${hit.id}`, onclick: open,
                                 onkeydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } } });
    const thumb = thumbnail(hit.thumbnail, `image ${hit.id}`);
    thumb.append(el("span", { class: "rank" }, `#${hit.rank}`));
    const caps = el("ul", { class: "caps" }, ...hit.captions.map((c) => el("li", {}, highlighted(c, words))));
    const scores = el("div", { class: "scores" },
      el("span", {}, "score ", el("b", {}, fmt(hit.score))),
      el("span", {}, `shortlist ${fmt(hit.shortlist_score)}`),
      el("span", {}, `image ${hit.id}`));
    const body = el("div", { class: "card-body" }, scores);
    if (hit.explain) body.append(explanation(hit, thumb));
    body.append(caps);
    card.append(thumb, body);
    return card;
  }));
}

function renderCaptions(body) {
  const image = body.image;
  els.queryImage.replaceChildren(
    thumbnail(image.thumbnail, `image ${image.id}`),
    el("div", {},
      el("h2", {}, `Captions for image ${image.id}`),
      el("p", {}, "Its own captions, then the gallery's captions ranked by the model."),
      el("ul", { class: "caps" }, ...image.captions.map((c) => el("li", {}, c)))));
  els.queryImage.hidden = false;
  els.results.className = "results captions";
  els.results.replaceChildren(...body.results.map((hit) => {
    const own = hit.image_id === image.id;
    const from = hit.image_id === null || hit.image_id === undefined ? el("span")
      : own ? el("span", { class: "own-tag" }, "✓ this image's caption")
      : el("a", { href: `?image_id=${hit.image_id}`, onclick: (e) => { e.preventDefault(); run({ image_id: hit.image_id }); } },
           `from image ${hit.image_id}`);
    return el("div", { class: "caption-row" + (own ? " own" : ""), "data-id": hit.id },
      el("span", { class: "pos" }, `#${hit.rank}`),
      el("span", {}, hit.captions.join(" ")),
      el("span", { class: "meta" }, `score ${fmt(hit.score)} · shortlist ${fmt(hit.shortlist_score)}`, el("br"), from));
  }));
}

function renderStatus(body, elapsed) {
  const what = body.direction === "text_to_image"
    ? [el("strong", {}, `${body.results.length} images`), ` for “${body.query}”`]
    : [el("strong", {}, `${body.results.length} captions`), ` for image ${body.query}`];
  const parts = [...what, ` in ${ms(elapsed)} (server ${ms(body.server_seconds)}; ${shortlistText(body)})`];
  if (body.unknown_words && body.unknown_words.length) {
    parts.push(el("span", { class: "warn" }, ` · not in the vocabulary, ignored: ${body.unknown_words.join(", ")}`));
  }
  els.status.replaceChildren(...parts);
}

function paramsOf(query) {
  const params = new URLSearchParams();
  if (query.image_id !== undefined) params.set("image_id", String(query.image_id));
  else params.set("q", query.q);
  // No more results than the gallery holds (the API rejects k beyond it).
  const size = info ? (query.image_id !== undefined ? info.num_captions : info.num_images) : Infinity;
  params.set("k", String(Math.min(Number(els.k.value), size || Infinity)));
  params.set("shortlist", els.shortlist.value);
  if (query.image_id === undefined && info && info.explain) params.set("explain", "1");
  return params;
}

async function run(query, push = true) {
  if (query.q !== undefined && !query.q.trim()) {
    showError("Type a description to search for.");
    return;
  }
  if (query.q !== undefined) els.q.value = query.q;
  const params = paramsOf(query);
  if (push) history.pushState(null, "", `?${params}`);
  if (pending) pending.abort();
  pending = new AbortController();
  clearView();
  showLoading();
  els.status.textContent = "searching…";
  els.go.disabled = true;
  const t0 = performance.now();
  try {
    const response = await fetch(`/api/search?${params}`, { signal: pending.signal });
    const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    const elapsed = (performance.now() - t0) / 1000;
    els.results.replaceChildren();
    if (!response.ok) {
      els.status.textContent = "";
      showError(body.error || `The server answered HTTP ${response.status}.`);
      return;
    }
    renderStatus(body, elapsed);
    if (body.direction === "text_to_image") renderImages(body, queryWords(body.query));
    else renderCaptions(body);
    if (!body.results.length) els.results.append(el("p", { class: "status" }, "No results."));
    window.scrollTo({ top: 0 });
  } catch (err) {
    if (err.name === "AbortError") return;
    els.results.replaceChildren();
    els.status.textContent = "";
    showError("Cannot reach the server: is `vsl serve` still running?");
  } finally {
    els.go.disabled = false;
  }
}

function fromLocation() {
  const params = new URLSearchParams(location.search);
  if (params.has("k")) els.k.value = params.get("k");
  if (params.has("shortlist")) els.shortlist.value = params.get("shortlist");
  if (params.has("image_id")) run({ image_id: Number(params.get("image_id")) }, false);
  else if (params.get("q")) run({ q: params.get("q") }, false);
  else { clearView(); els.status.textContent = ""; els.empty.hidden = false; els.q.value = ""; }
}

async function loadInfo() {
  try {
    const response = await fetch("/api/info");
    info = await response.json();
    const size = info.num_images.toLocaleString("en");
    const caps = info.num_captions ? `, ${info.num_captions.toLocaleString("en")} captions` : "";
    els.gallery.textContent = `${info.model} · ${size} images${caps} · ${info.index_type} index` +
      (info.data_name ? ` · ${info.data_name}/${info.split}` : "");
    for (const text of info.examples || []) {
      const query = text.replace(/\s*[.!?]+\s*$/, "");
      els.examples.append(el("button", { class: "chip", type: "button", onclick: () => run({ q: query }) }, query));
    }
  } catch (err) {
    els.gallery.textContent = "index info unavailable";
  }
}

els.form.addEventListener("submit", (event) => { event.preventDefault(); run({ q: els.q.value }); });
for (const control of [els.k, els.shortlist]) {
  control.addEventListener("change", () => {
    const params = new URLSearchParams(location.search);
    if (params.has("image_id")) run({ image_id: Number(params.get("image_id")) });
    else if (params.get("q")) run({ q: params.get("q") });
  });
}
els.home.addEventListener("click", (event) => { event.preventDefault(); history.pushState(null, "", "/"); fromLocation(); });
window.addEventListener("popstate", fromLocation);
// The gallery's size and abilities (k is clamped to it; explain only where it has boxes) come first.
loadInfo().then(fromLocation);
