// The annotator's page: pick a project, then answer tasks one after another. Keys are listed under each task.
"use strict";
let project = null, task = null, choice = null, order = [], conversation = [];
const $ = (id) => document.getElementById(id);
const LETTERS = "ABCDEFGH";

async function loadProjects() {
  task = null; ak.show("task", false); ak.show("projects");
  const list = $("project-list"); list.replaceChildren();
  for (const p of await ak.api("/api/projects")) {
    list.append(ak.el("li", {}, ak.el("button", {text: p.name, "data-project": p.name, onclick: () => open(p)}),
      ak.el("span", {class: "muted", text: `  ${p.kind}, ${p.complete} of ${p.items} items complete`})));
  }
}

function open(p) {
  project = p; conversation = [];
  ak.show("projects", false); ak.show("task");
  $("task-title").textContent = `${p.name} (${p.kind})`;
  $("instructions").textContent = p.instructions || "";
  ak.show("chat", p.kind === "arena");
  if (p.kind === "arena") { renderChat(); clearTask("Write a message: two models answer, you pick the better one."); }
  else next();
}

function clearTask(msg) {
  task = null; ak.show("prompt-box", false);
  $("responses").replaceChildren(); $("controls").replaceChildren(); $("keys").textContent = msg || "";
}

async function next() {
  clearTask(); ak.status("Loading…");
  try {
    const r = await ak.api(`/api/projects/${encodeURIComponent(project.name)}/next`, {});
    ak.status("");
    if (!r.task) { clearTask(); ak.status("Nothing left to judge in this project. Thank you!"); return; }
    render(r.task);
  } catch (e) { ak.status(e.message, true); }
}

function promptText(prompt) {
  return typeof prompt === "string" ? prompt : prompt.map((m) => `${m.role}: ${m.content}`).join("\n\n");
}

function render(t) {
  task = t; choice = null; order = t.responses.map((_, i) => i);
  task.clientId = crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2) + Date.now();
  ak.show("prompt-box", t.kind !== "arena");
  $("prompt").textContent = promptText(t.prompt);
  $("responses").className = t.kind === "ranking" ? "ranking" : "";
  ({pairwise: renderPair, arena: renderPair, ranking: renderRanking, thumbs: renderThumbs})[t.kind]();
}

function card(i, label) {
  return ak.el("div", {class: "card", "data-index": i, tabindex: 0},
    ak.el("div", {class: "label"}, ak.el("span", {text: label})),
    ak.el("div", {class: "text response", text: task.responses[i]}));
}

function button(text, key, onclick, cls = "") {
  return ak.el("button", {text, "data-key": key, class: cls, onclick});
}

function renderPair() {
  $("responses").replaceChildren(card(0, "Response A"), card(1, "Response B"));
  const reason = ak.el("textarea", {id: "reason", rows: 2, maxlength: 2000, placeholder: "Reason (optional)"});
  $("controls").replaceChildren(
    button("A is better", "a", () => send({choice: "a", reason: reason.value})),
    button("B is better", "b", () => send({choice: "b", reason: reason.value})),
    button("Tie", "t", () => send({choice: "tie", reason: reason.value})),
    button("Both bad", "x", () => send({choice: "both_bad", reason: reason.value})),
    skipButton(), reason);
  $("keys").textContent = "Keys: A or 1, B or 2, T tie, X both bad, S skip.";
}

function renderRanking() {
  const box = $("responses"); box.replaceChildren();
  order.forEach((i, pos) => {
    const c = card(i, `#${pos + 1}  (response ${LETTERS[i]})`);
    c.draggable = true;
    c.querySelector(".label").append(ak.el("span", {},
      button("↑", "", () => move(pos, -1), "up"), button("↓", "", () => move(pos, 1), "down")));
    c.addEventListener("dragstart", (e) => { e.dataTransfer.setData("text/plain", String(pos)); c.classList.add("dragging"); });
    c.addEventListener("dragend", () => c.classList.remove("dragging"));
    c.addEventListener("dragover", (e) => e.preventDefault());
    c.addEventListener("drop", (e) => { e.preventDefault(); place(Number(e.dataTransfer.getData("text/plain")), pos); });
    c.addEventListener("click", () => { choice = pos; highlight(); });
    box.append(c);
  });
  highlight();
  $("controls").replaceChildren(button("Submit ranking", "enter", () => send({ranking: order}), "primary"), skipButton());
  $("keys").textContent = "Keys: 1-8 select a response, J/K or arrows move it down/up, Enter submits, S skip. Or drag the cards.";
}

function highlight() {
  [...$("responses").children].forEach((c, pos) => c.classList.toggle("selected", pos === choice));
}

function place(from, to) {
  const [x] = order.splice(from, 1); order.splice(to, 0, x); choice = to; renderRanking();
}

function move(pos, delta) {
  const to = pos + delta;
  if (to >= 0 && to < order.length) place(pos, to);
}

function renderThumbs() {
  $("responses").replaceChildren(card(0, "Response"));
  const correction = ak.el("textarea", {id: "correction", rows: 4, maxlength: 8000, placeholder: "A better answer (optional)", hidden: ""});
  const submit = button("Submit thumbs down", "enter", () => send({thumb: "down", correction: correction.value}), "primary");
  submit.hidden = true;
  $("controls").replaceChildren(
    button("👍 Good", "u", () => send({thumb: "up"})),
    button("👎 Bad", "d", () => { correction.hidden = false; submit.hidden = false; correction.focus(); }),
    skipButton(), correction, submit);
  $("keys").textContent = "Keys: U good, D bad (then write a correction if you like, Enter in the box adds a line; the button submits), S skip.";
}

function skipButton() {
  return button("Skip", "s", async () => {
    try { await ak.api(`/api/tasks/${task.lease}/skip`, {}); } catch (e) { ak.status(e.message, true); }
    project.kind === "arena" ? clearTask() : next();
  });
}

async function send(answer, attempt = 0) {
  const t = task;
  if (!t) return;
  ak.status("Saving…");
  try {
    const ack = await ak.api(`/api/tasks/${t.lease}/answer`, {answer, client_id: t.clientId});
    ak.status(`Saved (vote ${ack.vote}).`);
    if (t.kind === "arena") {
      const picked = answer.choice === "b" ? t.responses[1] : t.responses[0];
      conversation.push({role: "assistant", content: picked}); renderChat(); clearTask();
    } else next();
  } catch (e) {
    if (e.status === undefined && attempt < 3) return setTimeout(() => send(answer, attempt + 1), 500 * 2 ** attempt);
    ak.status(e.message, true);
  }
}

function renderChat() {
  $("conversation").replaceChildren(...conversation.map((m) =>
    ak.el("div", {class: "turn text"}, ak.el("span", {class: "role", text: m.role === "user" ? "You:" : "Model:"}),
      document.createTextNode(m.content))));
}

$("chat-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("message").value.trim();
  if (!text || task) return;
  conversation.push({role: "user", content: text}); $("message").value = ""; renderChat(); ak.status("Asking two models…");
  try {
    const r = await ak.api(`/api/projects/${encodeURIComponent(project.name)}/arena`, {messages: conversation});
    ak.status(""); render(r.task);
  } catch (e) { conversation.pop(); renderChat(); ak.status(e.message, true); }
});
$("message").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("chat-form").requestSubmit(); }
});
$("back").addEventListener("click", loadProjects);

document.addEventListener("keydown", (ev) => {
  if (!task || ev.target.matches("textarea, input") || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const k = ev.key.toLowerCase();
  const click = (key) => { const b = $("controls").querySelector(`[data-key="${key}"]`); if (b && !b.hidden) { ev.preventDefault(); b.click(); } };
  if (task.kind === "ranking") {
    if (/^[1-8]$/.test(k) && Number(k) <= order.length) { choice = Number(k) - 1; highlight(); }
    else if ((k === "j" || k === "arrowdown") && choice !== null) { ev.preventDefault(); move(choice, 1); }
    else if ((k === "k" || k === "arrowup") && choice !== null) { ev.preventDefault(); move(choice, -1); }
    else if (k === "enter") click("enter"); else if (k === "s") click("s");
    return;
  }
  click({"1": "a", "2": "b"}[k] || k);
});

ak.start(loadProjects);
