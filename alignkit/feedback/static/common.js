// Shared by the pages: the API with the CSRF header, log in and out, the status line, and DOM helpers that
// only ever set text (never HTML), so model output and user text cannot inject markup.
"use strict";
const ak = {
  csrf: sessionStorage.getItem("ak_csrf") || "",
  async api(path, body) {
    const opts = body === undefined ? {} : {
      method: "POST", body: JSON.stringify(body),
      headers: {"Content-Type": "application/json", "X-CSRF-Token": ak.csrf},
    };
    const r = await fetch(path, opts);
    const data = r.headers.get("content-type")?.includes("json") ? await r.json() : null;
    if (!r.ok) { const e = new Error(data?.error || r.statusText); e.status = r.status; throw e; }
    return data;
  },
  el(tag, attrs = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "text") e.textContent = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  },
  show(id, on = true) { document.getElementById(id).hidden = !on; },
  status(msg, error = false) {
    const s = document.getElementById("status"); s.textContent = msg; s.className = error ? "error" : "";
  },
  async start(onReady) {
    document.getElementById("logout").addEventListener("click", async () => {
      await ak.api("/api/logout", {}).catch(() => {});
      sessionStorage.removeItem("ak_csrf"); location.reload();
    });
    document.getElementById("login-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        const who = await ak.api("/api/login", {token: document.getElementById("token").value});
        ak.csrf = who.csrf; sessionStorage.setItem("ak_csrf", who.csrf); ak.ready(who, onReady);
      } catch (e) { ak.status(e.status === 401 ? "Unknown token." : e.message, true); }
    });
    try { const who = await ak.api("/api/me"); if (who.csrf) ak.csrf = who.csrf; ak.ready(who, onReady); }
    catch (e) { ak.show("login"); document.getElementById("token").focus(); }
  },
  ready(who, onReady) {
    ak.show("login", false); ak.show("logout");
    document.getElementById("who").textContent = `${who.name} (${who.role})`;
    ak.status(""); onReady(who);
  },
};
