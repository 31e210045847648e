// The labelling page: the next queued prompt this labeller has not ranked, its candidates, click-to-rank.
// A labeller is their API key (of the role labeller or admin: the queue's rankings become training data); on a
// server started with --no-auth, the name typed here (sent as X-Palmchat-Labeller).
"use strict";

const $ = (id) => document.getElementById(id);

async function showStats() {
  const s = await apiJSON("GET", "/v1/label/stats");
  const agreement = s.agreement == null ? "n/a (no prompt ranked by two labellers yet)"
    : `${s.agreement.toFixed(2)} over ${s.agreement_tasks} prompt(s)`;
  $("stats").textContent = `${s.tasks} prompts in the queue, ${s.rankings} rankings by ${s.labellers} labeller(s); ` +
    `you ranked ${s.mine}. Agreement between labellers (mean pairwise): ${agreement}.`;
}

function showPrompt(task) {
  const box = el("div", { class: "prompt" });
  for (const m of task.messages) {
    box.append(el("div", { class: "turn " + m.role }, el("span", { class: "role" }, m.role), el("div", {}, m.content)));
  }
  return box;
}

async function next() {
  showError(null);
  const box = $("task");
  box.replaceChildren(el("p", { class: "note" }, "Loading the next prompt…"));
  try {
    await showStats();
    const { task } = await apiJSON("GET", "/v1/label/next");
    box.replaceChildren();
    if (!task) {
      box.append(el("p", { class: "note", id: "queue-empty" }, "Nothing left to rank. Thank you!"));
      return;
    }
    const submit = el("button", { class: "primary", id: "submit-ranking", disabled: true }, "Submit ranking");
    const { cards, ranking } = rankingCards(task.candidates, (complete) => { submit.disabled = !complete; });
    submit.addEventListener("click", async () => {
      submit.disabled = true;
      try {
        await apiJSON("POST", `/v1/label/tasks/${task.id}/ranking`, { ranking: ranking() });
        await next();
      } catch (e) { showError(e.message); submit.disabled = false; }
    });
    box.append(showPrompt(task), cards, submit);
  } catch (e) {
    box.replaceChildren();
    showError(e.message);
  }
}

$("api-key").value = settings.get("apiKey", "");
$("labeller").value = settings.get("labeller", "");
$("api-key").addEventListener("change", () => { settings.set("apiKey", $("api-key").value.trim()); next(); });
$("labeller").addEventListener("change", () => { settings.set("labeller", $("labeller").value.trim()); next(); });
next();
