// The admin page: a project's counts, agreement, annotators' quality, the models' ratings, plots and exports.
"use strict";
const $ = (id) => document.getElementById(id);
const fmt = (v) => v === null || v === undefined ? "–" : typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(3)) : String(v);

function table(rows, columns) {
  if (!rows.length) return ak.el("p", {class: "muted", text: "none yet"});
  return ak.el("table", {},
    ak.el("thead", {}, ak.el("tr", {}, ...columns.map((c) => ak.el("th", {text: c})))),
    ak.el("tbody", {}, ...rows.map((r) => ak.el("tr", {}, ...columns.map((c) => ak.el("td", {text: fmt(r[c])}))))));
}

async function show(name) {
  const base = `/api/admin/projects/${encodeURIComponent(name)}`;
  try {
    const s = await ak.api(`${base}/stats`);
    $("summary").replaceChildren(table([s.counts], Object.keys(s.counts)));
    $("agreement").replaceChildren(table([s.agreement], Object.keys(s.agreement)));
    $("annotators").replaceChildren(table(s.annotators, s.annotators.length ? Object.keys(s.annotators[0]) : []));
    $("leaderboard").replaceChildren(table(s.leaderboard, s.leaderboard.length ? Object.keys(s.leaderboard[0]) : []));
    $("plots").replaceChildren(...s.plots.map((p) => ak.el("img", {src: `${base}/plot/${p}.png`, alt: p})));
    $("exports").replaceChildren(...s.formats.map((f) =>
      ak.el("a", {href: `${base}/export?format=${f}`, download: `${name}-${f}.jsonl`, text: f + " ", class: "export"})));
  } catch (e) { ak.status(e.status === 403 ? "This page is for admins." : e.message, true); }
}

$("annotator-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    const r = await ak.api("/api/admin/annotators", {name: $("annotator-name").value, role: $("annotator-role").value});
    $("new-token").textContent = `Token for ${r.name} (shown once): ${r.token}`;
  } catch (e) { ak.status(e.message, true); }
});

ak.start(async (who) => {
  if (who.role !== "admin") { ak.status("This page is for admins.", true); return; }
  ak.show("admin");
  const projects = await ak.api("/api/projects");
  const sel = $("project");
  sel.replaceChildren(...projects.map((p) => ak.el("option", {value: p.name, text: p.name})));
  sel.addEventListener("change", () => show(sel.value));
  if (projects.length) show(projects[0].name);
});
