// What the chat page and the labelling page share: settings, the theme, API calls with OpenAI-shaped errors,
// server-sent events, and markdown rendering. No build step and no CDN: plain scripts served by palmchat serve.
"use strict";

const settings = {
  get(name, fallback) { return localStorage.getItem("palmchat." + name) ?? fallback; },
  set(name, value) { localStorage.setItem("palmchat." + name, value); },
  remove(name) { localStorage.removeItem("palmchat." + name); },
};

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  settings.set("theme", theme);
}
applyTheme(settings.get("theme", matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light"));

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body, signal) {
  const headers = { "Content-Type": "application/json" };
  const key = settings.get("apiKey", "");
  if (key) headers.Authorization = "Bearer " + key;
  const labeller = settings.get("labeller", "");  // names a labeller on a server started with --no-auth
  if (labeller) headers["X-Palmchat-Labeller"] = labeller;
  let response;
  try {
    response = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "The server cannot be reached. Is palmchat serve still running?");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const data = await response.json();
      message = data?.error?.message || message;
    } catch { /* not JSON: keep the status line */ }
    if (response.status === 401) message += " (set your API key in Settings)";
    if (response.status === 413) message += ". Shorten the message.";
    if (response.status === 429) message += ` (retry in ${response.headers.get("retry-after") || "a few"} s)`;
    throw new ApiError(response.status, message);
  }
  return response;
}

const apiJSON = async (method, path, body) => (await api(method, path, body)).json();

// The server's limits (GET /health, no key needed): request bytes, reply tokens, context tokens.
let serverLimits = null;
async function limits() {
  if (!serverLimits) {
    try {
      serverLimits = (await (await fetch("/health")).json()).limits;
    } catch {
      serverLimits = { max_request_bytes: 1 << 20, max_output_tokens: 4096, context_tokens: 2048 };
    }
  }
  return serverLimits;
}

const bytesOf = (text) => new TextEncoder().encode(text).length;
const kb = (bytes) => (bytes / 1024).toFixed(1) + " KB";

// Server-sent events from a fetch response: yields {event, data} with data parsed as JSON.
async function* sse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (!data || data === "[DONE]") continue;
      yield { event, data: JSON.parse(data) };
    }
  }
}

// A reply is untrusted text (the model can be made to write anything): its markdown becomes HTML that keeps only
// text structure. No images (a request to anywhere, or a tracking pixel), forms, inputs, styles, SVG or scripts;
// links only to http, https or mailto, opened in a new tab that cannot reach back to this page.
const MARKDOWN_HTML = {
  ALLOWED_TAGS: ["p", "br", "strong", "em", "code", "pre", "blockquote", "ul", "ol", "li", "a",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "hr", "del"],
  ALLOWED_ATTR: ["href", "title", "start", "align"],  // start: an ordered list's first number; align: a column's
  ADD_URI_SAFE_ATTR: ["start", "align"],  // not URLs: not held to ALLOWED_URI_REGEXP
  ALLOWED_URI_REGEXP: /^(?:https?|mailto):/i,
  ALLOW_DATA_ATTR: false,
  ALLOW_ARIA_ATTR: false,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName !== "A") return;
  if (node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

function renderMarkdown(element, text) {
  element.innerHTML = DOMPurify.sanitize(marked.parse(text, { breaks: true, gfm: true }), MARKDOWN_HTML);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children) node.append(child);
  return node;
}

// Icons drawn here (emoji fonts are missing on many machines): 24x24 strokes in the text colour.
const ICONS = {
  up: "M3 10h4v11H3z M7 10l4-8c1.7 0 3 1.3 3 3v4h5.5c1.2 0 2.1 1.1 1.9 2.3l-1.3 8.2c-.2 1-1 1.5-2 1.5H7",
  trash: "M4 7h16 M9 7V4h6v3 M6 7l1 13h10l1-13 M10 11v6 M14 11v6",
};

function icon(name, flip = false) {
  const span = el("span", { class: "svg-icon" + (flip ? " flip" : ""), "aria-hidden": "true" });
  span.innerHTML = `<svg viewBox="0 0 24 24" width="16" height="16" fill="none" stroke="currentColor" ` +
    `stroke-width="2" stroke-linecap="round" stroke-linejoin="round"><path d="${ICONS[name]}"/></svg>`;
  return span;
}

function showError(message) {
  const box = document.getElementById("error");
  if (!message) { box.hidden = true; return; }
  box.textContent = message;
  box.hidden = false;
}

document.getElementById("theme")?.addEventListener("click", () =>
  applyTheme(document.documentElement.dataset.theme === "dark" ? "light" : "dark"));

// Candidate replies side by side, ranked by clicking them from best to worst (click again to undo).
// `onChange(complete)` runs after each click; `ranking()` is every candidate id, the unclicked ones last.
function rankingCards(candidates, onChange) {
  const order = [];
  const cards = el("div", { class: "candidates" });
  for (const cand of candidates) {
    const body = el("div", { class: "body" });
    renderMarkdown(body, cand.text || "*(empty reply)*");
    cards.append(el("button", { class: "candidate", "data-id": cand.id, onclick: () => {
      const at = order.indexOf(cand.id);
      if (at >= 0) order.splice(at, 1); else order.push(cand.id);
      cards.querySelectorAll(".candidate").forEach((c) => {
        const r = order.indexOf(c.dataset.id);
        c.querySelector(".rank").textContent = r >= 0 ? "#" + (r + 1) : "";
        c.classList.toggle("ranked", r >= 0);
      });
      onChange(order.length >= candidates.length - 1);
    } }, el("span", { class: "rank" }, ""), body));
  }
  const ranking = () => [...order, ...candidates.map((c) => c.id).filter((id) => !order.includes(id))];
  return { cards, ranking };
}
