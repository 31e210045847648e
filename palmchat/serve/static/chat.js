// The chat page. Conversations live on the server (POST /v1/conversations, /v1/responses with `conversation`),
// so a reload, another tab or another device shows the same thing; the page keeps only settings locally.
// After every turn (finished, stopped or failed) the page redraws the conversation from the server, so what it
// shows is what was stored.
// A conversation is a tree: regenerating a reply or editing a message starts a new branch beside the old one
// (`branch_from`), "< 2/3 >" moves between the siblings, and the replies to one message can be ranked.
"use strict";

const $ = (id) => document.getElementById(id);
const REQUEST_ROOM = 4096;  // bytes of a request that are not the message: settings, system prompt, JSON
const state = { conversation: null, conversations: [], streaming: null, model: null, busy: false, context: null };

// ---- conversations list -------------------------------------------------------------------------------

async function loadConversations() {
  const list = await apiJSON("GET", "/v1/conversations?limit=100&order=desc");
  state.conversations = list.data;
  const ul = $("conversations");
  ul.replaceChildren();
  for (const c of list.data) {
    const title = c.metadata?.title || "Untitled";
    const li = el("li", { class: c.id === state.conversation ? "active" : "", "data-id": c.id },
      el("button", { class: "open", title, onclick: () => openConversation(c.id) }, title),
      el("button", { class: "icon", "aria-label": "Rename", title: "Rename", onclick: () => rename(c) }, "✎"),
      el("button", { class: "icon", "aria-label": "Delete", title: "Delete", onclick: () => remove(c) }, icon("trash")));
    ul.append(li);
  }
}

async function rename(c) {
  const title = prompt("New name", c.metadata?.title || "");
  if (title === null) return;
  const clean = title.trim().slice(0, 200);
  if (!clean) return showError("A conversation name cannot be empty.");
  await guarded(async () => {
    await apiJSON("POST", `/v1/conversations/${c.id}`, { metadata: { ...(c.metadata || {}), title: clean } });
    await loadConversations();
    if (c.id === state.conversation) $("title").textContent = clean;
  });
}

async function remove(c) {
  if (!confirm(`Delete “${c.metadata?.title || "Untitled"}”?`)) return;
  await guarded(async () => {
    await api("DELETE", `/v1/conversations/${c.id}`);
    rememberTruncation(c.id, null);
    if (c.id === state.conversation) newChat();
    await loadConversations();
  });
}

function newChat() {
  if (state.busy) return;
  state.conversation = null;
  history.replaceState(null, "", "/");
  $("title").textContent = "New chat";
  $("messages").replaceChildren();
  $("input").focus();
  document.querySelectorAll("#conversations li").forEach((li) => li.classList.remove("active"));
  document.body.classList.remove("sidebar-open");
}

// Redraw a conversation from the server: the current branch of its tree and the caller's thumbs on it.
async function showConversation(id) {
  const [tree, ratings] = await Promise.all([
    apiJSON("GET", `/v1/conversations/${id}/tree`), apiJSON("GET", `/v1/feedback?conversation_id=${encodeURIComponent(id)}`)]);
  state.conversation = id;
  history.replaceState(null, "", "/?c=" + id);
  const meta = state.conversations.find((c) => c.id === id);
  $("title").textContent = meta?.metadata?.title || "Untitled";
  $("messages").replaceChildren();
  const rated = Object.fromEntries(ratings.data.map((f) => [f.item_id, f.rating]));
  const byId = Object.fromEntries(tree.data.map((item) => [item.id, item]));
  const children = {};
  for (const item of tree.data) (children[item.parent_id ?? ""] ||= []).push(item);
  const branch = [];
  for (let item = byId[tree.current_item]; item; item = byId[item.parent_id]) branch.unshift(item);
  for (const item of branch) {
    if (item.type === "function_call" || item.type === "function_call_output") addToolItem(item);
    if (item.type !== "message") continue;
    const parts = item.content || [];
    const text = parts.map((part) => part.text || part.refusal || "").join("");
    const msg = addMessage(item.role, text, item, rated[item.id], children[item.parent_id ?? ""]);
    if (item.role === "assistant" && item.status === "incomplete") {
      msg.querySelector(".body").append(el("p", { class: "note" }, "(incomplete: stopped, or cut at the length limit)"));
    }
  }
  showTruncation(id);
  document.querySelectorAll("#conversations li").forEach((li) => li.classList.toggle("active", li.dataset.id === id));
  document.body.classList.remove("sidebar-open");
  markLastAssistant();
}

// What the last reply's prompt left out to fit the model's context (the server's `truncation_details`), kept per
// conversation and shown as a line after the last message left out.
function rememberTruncation(conversation, details) {
  if (details) settings.set("truncated." + conversation, JSON.stringify(details));
  else settings.remove("truncated." + conversation);
}

function showTruncation(id) {
  const details = JSON.parse(settings.get("truncated." + id, "") || "null");
  const messages = [...document.querySelectorAll("#messages .message")];
  if (!details || !details.dropped_messages || details.dropped_messages >= messages.length) return;
  const context = state.context ? ` (${state.context} tokens)` : "";
  const count = details.dropped_messages === 1 ? "The message above is" : `The ${details.dropped_messages} messages above are`;
  messages[details.dropped_messages - 1].after(el("p", { class: "note truncated", role: "note" },
    `${count} no longer in the model's context${context}: the last reply was written without them.`));
}

async function openConversation(id) {
  if (state.busy) return;
  await guarded(() => showConversation(id));
}

// ---- messages -------------------------------------------------------------------------------------------

// A message; `item` (from the server) gives it its actions, `siblings` (the replies or messages beside it,
// itself included) the "< 2/3 >" control.
function addMessage(role, text, item, rating, siblings) {
  const body = el("div", { class: "body" });
  const msg = el("article", { class: "message " + role, "data-item": item?.id || "" }, el("div", { class: "role" }, role), body);
  if (role === "assistant") renderMarkdown(body, text); else body.textContent = text;
  if (item) msg.append(actionBar(msg, item, text, rating, siblings || [item]));
  $("messages").append(msg);
  msg.scrollIntoView({ block: "end" });
  return msg;
}

// A call the model made to a client's tool, or the result the client sent back: conversations an agent ran
// through the API (`tools` on /v1/responses) show them between the messages, as text.
function addToolItem(item) {
  const call = item.type === "function_call";
  $("messages").append(el("article", { class: "tool-item", "data-item": item.id || "" },
    el("div", { class: "role" }, call ? "tool call" : "tool result"),
    el("pre", {}, call ? `${item.name}(${item.arguments})` : String(item.output ?? ""))));
}

function actionBar(msg, item, text, rating, siblings) {
  const bar = el("div", { class: "actions" });
  if (siblings.length > 1) {
    const at = siblings.findIndex((s) => s.id === item.id);
    const go = (step) => guarded(async () => {
      await apiJSON("POST", `/v1/conversations/${state.conversation}/branch`, { item_id: siblings[at + step].id });
      await showConversation(state.conversation);
    });
    bar.append(el("span", { class: "branches", role: "group", "aria-label": "Versions" },
      el("button", { class: "icon prev", "aria-label": "Previous version", disabled: at === 0, onclick: () => go(-1) }, "‹"),
      el("span", { class: "position" }, `${at + 1}/${siblings.length}`),
      el("button", { class: "icon next", "aria-label": "Next version", disabled: at === siblings.length - 1, onclick: () => go(1) }, "›")));
  }
  if (item.role === "assistant") {
    const rate = (value) => guarded(async () => {
      const comment = prompt(value > 0 ? "What was good? (optional)" : "What was wrong? (optional)");
      if (comment === null) return;  // cancelled
      await apiJSON("POST", "/v1/feedback", { item_id: item.id, conversation_id: state.conversation, rating: value, comment });
      bar.querySelectorAll(".rate").forEach((b) => b.classList.remove("chosen"));
      bar.querySelector(value > 0 ? ".up" : ".down").classList.add("chosen");
    });
    bar.append(
      el("button", { class: "icon rate up" + (rating > 0 ? " chosen" : ""), "aria-label": "Good reply", title: "Good reply", onclick: () => rate(1) }, icon("up")),
      el("button", { class: "icon rate down" + (rating < 0 ? " chosen" : ""), "aria-label": "Bad reply", title: "Bad reply", onclick: () => rate(-1) }, icon("up", true)),
      el("button", { class: "icon regenerate", "aria-label": "Regenerate", title: "Another reply (kept beside this one)", onclick: () => regenerate(msg, item) }, "↻"));
    if (siblings.length > 1) {
      bar.append(el("button", { class: "icon rank", "aria-label": "Rank the versions", title: "Rank the versions of this reply", onclick: () => rankSiblings(msg, item, siblings) }, "⇅"));
    }
  } else if (item.role === "user") {
    bar.append(el("button", { class: "icon edit", "aria-label": "Edit", title: "Edit (a new branch; the old one is kept)", onclick: () => editMessage(msg, item, text) }, "✎"));
  }
  bar.append(el("button", { class: "icon delete-branch", "aria-label": "Delete this version", title: "Delete this message and what follows it", onclick: () => deleteBranch(item) }, icon("trash")));
  return bar;
}

function markLastAssistant() {
  const all = document.querySelectorAll("#messages .message.assistant");
  all.forEach((m, i) => m.classList.toggle("last", i === all.length - 1));
}

// ---- sending ----------------------------------------------------------------------------------------------

function requestSettings() {
  return {
    model: $("model").value || state.model,
    temperature: Number($("temperature").value),
    max_output_tokens: Number($("max-tokens").value) || undefined,  // unset: the reply may use the room left
    instructions: $("system").value.trim() || undefined,
    truncation: "auto",  // a long conversation leaves out its oldest messages instead of failing
  };
}

// Why a message cannot be sent, or null. The server enforces its own limits too (413, context length): their
// messages are shown the same way.
async function problemWith(text) {
  if (!text) return "Type a message first.";
  const limit = (await limits()).max_request_bytes - REQUEST_ROOM;
  const size = bytesOf(text);
  if (size > limit) return `The message is ${kb(size)}; this server takes at most ${kb(limit)} per message. Shorten it (nothing was sent).`;
  return null;
}

async function ensureConversation(firstMessage) {
  if (state.conversation) return state.conversation;
  const title = firstMessage.replace(/\s+/g, " ").slice(0, 60);
  const c = await apiJSON("POST", "/v1/conversations", { metadata: { title } });
  state.conversation = c.id;
  history.replaceState(null, "", "/?c=" + c.id);
  $("title").textContent = title;
  await loadConversations().catch(() => {});
  return c.id;
}

async function send(raw) {
  if (state.busy) return;
  const text = raw.trim();
  const problem = await problemWith(text);
  if (problem) return showError(problem);
  showError(null);
  setBusy(true);
  let conversation = null;
  const fresh = !state.conversation;
  const ok = await guarded(async () => {
    conversation = await ensureConversation(text);
    $("input").value = "";
    updateHint();
    addMessage("user", text);
    if ($("compare").checked) await compare(conversation, text);
    else await stream(conversation, { input: text });
  });
  setBusy(false);
  if (!ok) {
    if (!$("input").value) $("input").value = text;  // nothing is lost: the text comes back for another try
    if (conversation) await afterFailure(conversation, fresh);
  }
}

// Show what the server kept after a failed send; a conversation created for this message that holds nothing
// is deleted again, so that failures leave no empty conversations behind.
async function afterFailure(conversation, fresh) {
  try {
    const items = await apiJSON("GET", `/v1/conversations/${conversation}/items?limit=1`);
    if (fresh && !items.data.length) {
      await api("DELETE", `/v1/conversations/${conversation}`);
      const message = $("error").textContent;
      newChat();
      showError(message);
      await loadConversations();
    } else {
      await showConversation(conversation);
    }
  } catch { /* the message shown already says what went wrong */ }
}

async function stream(conversation, body) {
  const msg = addMessage("assistant", "");
  msg.classList.add("pending");
  const content = msg.querySelector(".body");
  const controller = new AbortController();
  state.streaming = controller;
  $("stop").hidden = false;
  $("send").hidden = true;
  let text = "", itemId = null, stopped = false, drawing = 0;
  const draw = () => {  // every 40 ms at most: markdown is rendered from the whole text so far
    drawing = 0;
    renderMarkdown(content, text);
    msg.scrollIntoView({ block: "end" });
  };
  try {
    const response = await api("POST", "/v1/responses",
      { ...requestSettings(), ...body, conversation, stream: true }, controller.signal);
    for await (const { data } of sse(response)) {
      if (data.type === "response.created") {
        rememberTruncation(conversation, data.response?.truncation_details);
      } else if (data.type === "response.output_item.added") {
        itemId = data.item?.id;
      } else if (data.type === "response.output_text.delta") {
        text += data.delta;
        drawing ||= setTimeout(draw, 40);
      } else if (data.type === "error" || data.type === "response.failed") {
        throw new ApiError(500, data.message || data.response?.error?.message || "generation failed");
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") throw e;
    stopped = true;
  } finally {
    if (drawing) { clearTimeout(drawing); draw(); }
    state.streaming = null;
    $("stop").hidden = true;
    $("send").hidden = false;
    msg.classList.remove("pending");
  }
  // A stopped reply is stored by the server as it stood when the request went away: wait until it is there.
  if (stopped && itemId) await waitForItem(conversation, itemId);
  await showConversation(conversation);
}

async function waitForItem(conversation, itemId) {
  for (let i = 0; i < 30; i++) {
    const items = await apiJSON("GET", `/v1/conversations/${conversation}/items?limit=5&order=desc`);
    if (items.data.some((item) => item.id === itemId)) return;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

// Another reply to the user message before `item`, as a new branch beside it.
async function regenerate(msg, item) {
  await branchTurn(msg, { input: [], branch_from: item.parent_id });
}

// Edit a user message in place; saving sends it as a new branch after the message before it.
function editMessage(msg, item, text) {
  if (state.busy) return;
  const box = el("textarea", { class: "edit-box", rows: 3, "aria-label": "Edited message" });
  box.value = text;
  const save = el("button", { class: "primary save-edit" }, "Send");
  const cancel = el("button", { class: "cancel-edit" }, "Cancel");
  const form = el("div", { class: "editing" }, box, el("div", { class: "row" }, save, cancel));
  msg.querySelector(".body").replaceWith(form);
  msg.querySelector(".actions").hidden = true;
  box.focus();
  cancel.addEventListener("click", () => showConversation(state.conversation));
  save.addEventListener("click", async () => {
    const edited = box.value.trim();
    const problem = await problemWith(edited);
    if (problem) return showError(problem);
    await branchTurn(msg, { input: edited, branch_from: item.parent_id ?? "" }, edited);
  });
}

// A turn on a new branch: the messages from `msg` on are replaced by the new turn as it streams in.
async function branchTurn(msg, body, userText) {
  if (state.busy || !state.conversation) return;
  showError(null);
  setBusy(true);
  const conversation = state.conversation;
  while (msg.nextSibling) msg.nextSibling.remove();
  msg.remove();
  const ok = await guarded(async () => {
    if (userText !== undefined) addMessage("user", userText);
    await stream(conversation, body);
  });
  setBusy(false);
  if (!ok) await showConversation(conversation).catch(() => {});
}

async function deleteBranch(item) {
  if (state.busy) return;
  if (!confirm("Delete this message and everything after it in this branch?")) return;
  await guarded(async () => {
    await api("DELETE", `/v1/conversations/${state.conversation}/branches/${item.id}`);
    await showConversation(state.conversation);
  });
}

// Rank the versions of a reply (the replies to one user message), best first.
function rankSiblings(msg, item, siblings) {
  if (state.busy || document.querySelector(".compare")) return;
  const candidates = siblings.map((s) => ({ id: s.id, text: (s.content || []).map((p) => p.text || p.refusal || "").join("") }));
  const submit = el("button", { class: "primary submit-ranking", disabled: true }, "Submit ranking");
  const cancel = el("button", { class: "cancel-ranking" }, "Cancel");
  const { cards, ranking } = rankingCards(candidates, (complete) => { submit.disabled = !complete; });
  const panel = el("section", { class: "compare" },
    el("p", { class: "hint" }, "Click the versions from best to worst (click again to undo), then submit."),
    cards, el("div", { class: "row" }, submit, cancel));
  cancel.addEventListener("click", () => panel.remove());
  submit.addEventListener("click", async () => {
    submit.disabled = true;
    const ok = await guarded(() => apiJSON("POST",
      `/v1/conversations/${state.conversation}/items/${item.parent_id}/ranking`, { ranking: ranking() }));
    panel.replaceChildren(el("p", { class: "note ranked" }, ok ? "Ranking saved. Thank you." : "The ranking was not saved."));
  });
  msg.after(panel);
  panel.scrollIntoView({ block: "end" });
}

// ---- compare: n candidates side by side, ranked by clicks ------------------------------------------------

async function compare(conversation, text) {
  const n = Number($("compare-n").value);
  const waiting = el("p", { class: "note" }, `Generating ${n} candidates…`);
  $("messages").append(waiting);
  let result;
  try {
    result = await apiJSON("POST", `/v1/conversations/${conversation}/compare`, { ...requestSettings(), input: text, n });
  } finally {
    waiting.remove();
  }
  rememberTruncation(conversation, result.truncation_details);
  const submit = el("button", { class: "primary submit-ranking", disabled: true }, "Submit ranking");
  const { cards, ranking } = rankingCards(result.candidates, (complete) => { submit.disabled = !complete; });
  const panel = el("section", { class: "compare" },
    el("p", { class: "hint" }, "Click the replies from best to worst (click again to undo), then submit. " +
      "The best one continues the conversation."), cards, submit);
  submit.addEventListener("click", async () => {
    submit.disabled = true;
    const ok = await guarded(() => apiJSON("POST", `/v1/comparisons/${result.id}/ranking`, { ranking: ranking() }));
    panel.remove();
    if (ok) return showConversation(conversation).catch((e) => showError(e.message));
    // Not stored (e.g. the conversation was deleted meanwhile): show what exists now, keep the message.
    await loadConversations().catch(() => {});
    if (state.conversations.some((c) => c.id === conversation)) await showConversation(conversation).catch(() => {});
    else { const message = $("error").textContent; newChat(); showError(message); }
  });
  $("messages").append(panel);
  panel.scrollIntoView({ block: "end" });
}

// ---- wiring ----------------------------------------------------------------------------------------------

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
}

async function guarded(fn) {
  try {
    await fn();
    return true;
  } catch (e) {
    showError(e.message || String(e));
    return false;
  }
}

async function updateHint() {
  const limit = (await limits()).max_request_bytes - REQUEST_ROOM;
  const size = bytesOf($("input").value);
  const hint = $("limit");
  hint.textContent = size > limit ? `${kb(size)} of at most ${kb(limit)}: too long to send`
    : size > limit * 0.8 ? `${kb(size)} of at most ${kb(limit)}` : "";
  hint.classList.toggle("over", size > limit);
}

$("composer").addEventListener("submit", (e) => { e.preventDefault(); send($("input").value); });
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send($("input").value); }
});
$("input").addEventListener("input", updateHint);
$("stop").addEventListener("click", () => state.streaming?.abort());
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && state.streaming) state.streaming.abort();
  if (e.ctrlKey && e.shiftKey && e.key.toLowerCase() === "o") { e.preventDefault(); newChat(); }
});
$("new-chat").addEventListener("click", newChat);
$("open-sidebar").addEventListener("click", () => document.body.classList.add("sidebar-open"));
$("close-sidebar").addEventListener("click", () => document.body.classList.remove("sidebar-open"));
$("open-settings").addEventListener("click", () => $("settings").showModal());
$("settings").addEventListener("close", () => {
  settings.set("apiKey", $("api-key").value.trim());
  settings.set("temperature", $("temperature").value);
  settings.set("maxTokens", $("max-tokens").value);
  settings.set("model", $("model").value);
  boot();
});
$("system").addEventListener("change", () => settings.set("system", $("system").value));

async function boot() {
  $("api-key").value = settings.get("apiKey", "");
  $("temperature").value = settings.get("temperature", "0.7");
  $("max-tokens").value = settings.get("maxTokens", "");
  $("system").value = settings.get("system", "");
  showError(null);
  await guarded(async () => {
    const models = (await apiJSON("GET", "/v1/models")).data.filter((m) => !m.id.includes(":"));
    $("model").replaceChildren(...models.map((m) => el("option", { value: m.id }, m.id)));
    state.model = settings.get("model", models[0]?.id);
    if (models.some((m) => m.id === state.model)) $("model").value = state.model;
    state.context = models.find((m) => m.id === $("model").value)?.max_model_len || null;
    // a reply longer than the context minus the smallest prompt (bos, a role, one token, end, assistant) never fits
    const most = Math.min((await limits()).max_output_tokens, state.context ? state.context - 5 : Infinity);
    $("max-tokens").max = most;
    $("max-tokens").placeholder = `auto (up to ${most})`;
    $("context").textContent = state.context ? `The model's context holds ${state.context} tokens: a reply and ` +
      "the conversation before it. Older messages are left out when a conversation grows longer." : "";
    await loadConversations();
    const wanted = new URLSearchParams(location.search).get("c");
    if (wanted && state.conversations.some((c) => c.id === wanted)) await showConversation(wanted);
    else if (wanted) { newChat(); showError("That conversation no longer exists (it was deleted)."); }
  });
  $("input").focus();
}

boot();
