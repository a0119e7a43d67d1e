// Tollgate portal: calls the HTTP API with the session cookie and the page's CSRF token, and
// keeps the overview, the usage chart, the delivery log and the live feed current without a
// reload. The API answers every refusal with a message; the page shows it as it is.
"use strict";
(function () {
  const body = document.body;
  const customer = body.dataset.customer;
  const page = body.dataset.page;
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";
  const enc = encodeURIComponent;
  const base = `/v1/customers/${enc(customer || "")}`;

  async function api(method, url, data) {
    const init = { method, headers: { "x-csrf-token": csrf }, credentials: "same-origin" };
    if (data !== undefined) {
      init.headers["content-type"] = "application/json";
      init.body = JSON.stringify(data);
    }
    const r = await fetch(url, init);
    let json = null;
    try { json = await r.json(); } catch (_) { /* no body */ }
    return { ok: r.ok, status: r.status, json };
  }

  function reason(res) {
    const e = res.json && res.json.error;
    if (!e) return `refused (${res.status})`;
    return [e.message].concat(e.problems || []).join(" — ");
  }

  function showError(text) {
    const el = document.getElementById("page-error");
    if (!el) return;
    el.textContent = text || "";
    el.hidden = !text;
  }

  function cell(tr, text) {
    const td = document.createElement("td");
    td.textContent = text;
    tr.appendChild(td);
  }

  // Overview: expand and collapse, and fresh bars every two seconds.
  document.addEventListener("click", (ev) => {
    const t = ev.target.closest(".toggle");
    if (!t || t.classList.contains("leaf")) return;
    const li = t.closest("li[data-entity]");
    if (li.getAttribute("aria-expanded") === "true") {
      ev.preventDefault();
      ev.stopImmediatePropagation();
      li.setAttribute("aria-expanded", "false");
      li.querySelector(":scope > .kids").innerHTML = "";
    } else {
      li.setAttribute("aria-expanded", "true");
    }
  }, true);

  async function refreshBars() {
    const rows = Array.from(document.querySelectorAll("li[data-entity]")).slice(0, 200);
    if (!rows.length) return;
    const ids = rows.map((r) => r.dataset.entity);
    const r = await fetch(`/portal/c/${enc(customer)}/budgets?ids=${ids.map(enc).join(",")}`, { credentials: "same-origin" });
    if (!r.ok) return;
    const all = await r.json();
    let moved = false;
    for (const li of rows) {
      const bars = all[li.dataset.entity];
      if (!bars) continue;
      let worst = "ok";
      for (const b of bars) {
        const el = li.querySelector(`:scope > .bars > [data-limit="${CSS.escape(b.limitId)}"]`);
        if (!el) continue;
        el.classList.remove("ok", "near", "over");
        el.classList.add(b.state);
        el.querySelector(".fill").style.width = `${b.pct}%`;
        el.querySelector(".bar").setAttribute("aria-valuenow", b.used);
        if (el.querySelector(".used").textContent !== String(b.used)) moved = true;
        el.querySelector(".used").textContent = b.used;
        el.querySelector(".remaining").textContent = b.remainingText;
        if (b.state === "over" || (b.state === "near" && worst === "ok")) worst = b.state;
      }
      li.classList.remove("ok", "near", "over");
      li.classList.add(worst);
    }
    // Usage moved: the spend above follows at once rather than at its own next refresh, so the
    // two never tell different stories for long.
    if (moved && document.getElementById("spend")) refreshSpend();
  }

  // Usage explorer: the chart, top spenders and the CSV of what the chart shows.
  let chart = null;
  function explorerQuery() {
    const f = document.getElementById("explore");
    const range = Number(f.range.value);
    const to = new Date();
    const from = new Date(to.getTime() - range * 1000);
    const q = new URLSearchParams({ from: from.toISOString(), to: to.toISOString(), windowSize: f.windowSize.value });
    q.append("groupBy", f.groupBy.value);
    return { q, by: f.groupBy.value, from, to, measure: f.measure ? f.measure.value : "units" };
  }
  async function refreshExplorer() {
    const { q, by, from, to, measure } = explorerQuery();
    document.getElementById("csv").href = `/portal/c/${enc(customer)}/usage.csv?${q}`;
    const h = await api("GET", `${base}/usage/history?${q}`);
    if (!h.ok) { showError(reason(h)); return; }
    showError("");
    const series = h.json.series;
    const empty = document.getElementById("chart-empty");
    const host = document.getElementById("chart");
    empty.hidden = series.length > 0;
    const xs = series.length ? series[0].points.map((p) => Date.parse(p.windowStart) / 1000) : [];
    const data = [xs].concat(series.map((s) => s.points.map((p) => p[measure] ?? 0)));
    const names = series.map((s) => Object.values(s.groupBy).map((v) => v ?? "(none)").join(" · ") || "all");
    const colors = ["#0969da", "#c62828", "#2e7d32", "#ef6c00", "#8250df", "#1b7c83", "#bf3989", "#57606a"];
    if (chart) { chart.destroy(); chart = null; }
    host.innerHTML = "";
    if (series.length && window.uPlot) {
      chart = new uPlot({
        width: Math.max(host.clientWidth, 400), height: 320,
        series: [{}].concat(names.map((n, i) => ({ label: n, stroke: colors[i % colors.length], width: 2 }))),
        axes: [{}, { label: measure === "requests" ? "calls" : measure }],
      }, data, host);
    }
    host.dataset.series = String(series.length);
    host.dataset.total = String(series.reduce((a, s) => a + s.points.reduce((b, p) => b + p.units, 0), 0));
    const t = new URLSearchParams({ by, from: from.toISOString(), to: to.toISOString(), limit: "10" });
    const top = await api("GET", `${base}/usage/top?${t}`);
    const tbody = document.querySelector("#top tbody");
    const byField = document.querySelector('#explore select[name="groupBy"]');
    document.getElementById("top-key").textContent = byField ? byField.options[byField.selectedIndex].text : by;
    tbody.innerHTML = "";
    if (top.ok) {
      for (const row of top.json.rows) {
        const tr = document.createElement("tr");
        cell(tr, row.value ?? "(none)"); cell(tr, row.units); cell(tr, row.requests);
        cell(tr, row.credits ?? 0); cell(tr, row.denied ?? 0);
        tbody.appendChild(tr);
      }
    }
  }

  // Overview: spend in money (or credits), period over period, by the chosen key.
  async function refreshSpend() {
    const form = document.getElementById("spend-form");
    const section = document.getElementById("spend");
    const by = form.by.value;
    const q = new URLSearchParams({ by, days: form.days.value, limit: "10" });
    const r = await api("GET", `${base}/usage/spend?${q}`);
    if (!r.ok) { showError(reason(r)); return; }
    const s = r.json;
    const entityKeys = (section.dataset.entityKeys || "").split(",");
    const money = (amount, credits) => {
      if (s.currency && amount !== null && amount !== undefined) {
        try {
          return new Intl.NumberFormat("en", { style: "currency", currency: s.currency }).format(Number(amount));
        } catch (_) { return `${amount} ${s.currency}`; }
      }
      return `${credits.toLocaleString("en")} credits`;
    };
    const pct = (change, now) => {
      if (change === null || change === undefined) return now > 0 ? "new" : "—";
      const p = Math.round(change * 100);
      return `${p > 0 ? "+" : ""}${p} %`;
    };
    const label = form.by.options[form.by.selectedIndex].text;
    document.getElementById("spend-total").textContent = money(s.total.amount, s.total.credits);
    document.getElementById("spend-credits").textContent = s.currency ? `${s.total.credits.toLocaleString("en")} credits` : "";
    document.getElementById("spend-change").textContent = pct(s.change, s.total.credits);
    document.getElementById("spend-previous").textContent = `before: ${money(s.previous.amount, s.previous.credits)}`;
    document.getElementById("spend-requests").textContent = s.total.requests.toLocaleString("en");
    document.getElementById("spend-denied").textContent = s.total.denied.toLocaleString("en");
    section.dataset.credits = String(s.total.credits);
    document.getElementById("spend-empty").hidden = s.total.credits > 0 || s.total.requests > 0 || s.total.denied > 0;
    // One bar a window, as tall as its share of the busiest window.
    const bars = document.getElementById("spend-bars");
    const most = Math.max(1, ...s.points.map((p) => p.credits));
    bars.replaceChildren(...s.points.map((p) => {
      const b = document.createElement("span");
      b.className = "bar-col";
      b.style.height = `${Math.round((p.credits / most) * 100)}%`;
      b.title = `${p.windowStart}: ${money(p.amount, p.credits)}`;
      return b;
    }));
    document.getElementById("spend-by").textContent = label;
    const who = (v) => {
      const td = document.createElement("td");
      if (v === null || v === undefined) { td.textContent = "(none)"; return td; }
      if (entityKeys.includes(by)) {
        // Drill down: the entity in the tree, with its limits.
        const a = document.createElement("a");
        a.href = `/portal/c/${enc(customer)}/?q=${enc(v)}`;
        a.textContent = v;
        td.appendChild(a);
      } else {
        td.textContent = v;
      }
      return td;
    };
    const rows = document.querySelector("#spend-rows tbody");
    rows.replaceChildren(...s.rows.map((row) => {
      const tr = document.createElement("tr");
      tr.dataset.value = row.value ?? "";
      tr.appendChild(who(row.value));
      cell(tr, money(row.amount, row.credits));
      cell(tr, row.credits.toLocaleString("en"));
      cell(tr, pct(row.change, row.credits));
      cell(tr, s.total.credits ? `${Math.round((row.credits / s.total.credits) * 100)} %` : "—");
      cell(tr, row.units.toLocaleString("en"));
      return tr;
    }));
    const movers = document.querySelector("#spend-movers tbody");
    movers.replaceChildren(...s.movers.map((row) => {
      const tr = document.createElement("tr");
      tr.appendChild(who(row.value));
      cell(tr, row.previousCredits.toLocaleString("en"));
      cell(tr, row.credits.toLocaleString("en"));
      cell(tr, pct(row.change, row.credits));
      return tr;
    }));
    const denials = document.querySelector("#spend-denials tbody");
    denials.replaceChildren(...s.denials.map((d) => {
      const tr = document.createElement("tr");
      cell(tr, d.limitId ?? "(unknown)");
      cell(tr, d.denied.toLocaleString("en"));
      return tr;
    }));
  }

  // Customers (the operator): each customer's spend of the last 7 days, a few at a time.
  async function fillCustomers() {
    const rows = Array.from(document.querySelectorAll("#customers tr[data-customer]"));
    const fill = async (tr) => {
      const c = tr.dataset.customer;
      const r = await api("GET", `/v1/customers/${enc(c)}/usage/spend?by=featureId&days=7&limit=1`);
      const put = (cls, text) => { tr.querySelector(`.${cls}`).textContent = text; };
      if (!r.ok) { put("spent", reason(r)); return; }
      const s = r.json;
      let spent = `${s.total.credits.toLocaleString("en")} credits`;
      if (s.currency && s.total.amount !== null) {
        try {
          spent = new Intl.NumberFormat("en", { style: "currency", currency: s.currency }).format(Number(s.total.amount));
        } catch (_) { spent = `${s.total.amount} ${s.currency}`; }
      }
      put("spent", spent);
      put("credits", s.total.credits.toLocaleString("en"));
      put("change", s.change === null ? (s.total.credits > 0 ? "new" : "—") : `${Math.round(s.change * 100)} %`);
      put("calls", s.total.requests.toLocaleString("en"));
      put("denied", s.total.denied.toLocaleString("en"));
    };
    // Four at a time: a long list does not flood the server.
    for (let i = 0; i < rows.length; i += 4) {
      await Promise.all(rows.slice(i, i + 4).map(fill));
    }
  }

  // Alerts: rules, webhooks (secret shown once), test deliveries and the delivery log.
  async function refreshDeliveries() {
    const r = await api("GET", `${base}/alerts/deliveries?limit=50`);
    const tbody = document.querySelector("#deliveries tbody");
    if (!r.ok || !tbody) return;
    tbody.innerHTML = "";
    for (const d of r.json.deliveries) {
      const tr = document.createElement("tr");
      tr.dataset.status = d.status;
      cell(tr, d.createdAt); cell(tr, d.webhookId); cell(tr, d.eventType);
      cell(tr, d.status); cell(tr, String((d.attempts || []).length));
      tbody.appendChild(tr);
    }
  }
  function wireAlerts() {
    const reload = () => window.location.reload();
    const act = async (method, url, data, then) => {
      const r = await api(method, url, data);
      if (!r.ok) { showError(reason(r)); return; }
      showError("");
      then(r);
    };
    document.querySelectorAll(".delete-rule").forEach((b) => b.addEventListener("click", () =>
      act("DELETE", `${base}/alerts/${enc(b.dataset.id)}`, undefined, reload)));
    document.querySelectorAll(".edit-rule").forEach((b) => b.addEventListener("click", () => {
      const r = JSON.parse(b.dataset.json);
      const f = document.getElementById("rule-form");
      f.id.value = r.id; f.entityType.value = r.entityType || ""; f.entity.value = r.entity || "";
      if (r.feature) f.feature.value = r.feature;
      f.percent.value = (r.percent || []).join(", ");
      f.querySelectorAll('input[name="webhooks"]').forEach((c) => { c.checked = (r.webhooks || []).includes(c.value); });
      f.id.focus();
    }));
    const rf = document.getElementById("rule-form");
    if (rf) rf.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const rule = { id: rf.id.value.trim(), feature: rf.feature.value,
        percent: rf.percent.value.split(",").map((s) => s.trim()).filter(Boolean).map(Number),
        webhooks: Array.from(rf.querySelectorAll('input[name="webhooks"]:checked')).map((c) => c.value) };
      if (rf.entity.value.trim()) rule.entity = rf.entity.value.trim(); else if (rf.entityType.value) rule.entityType = rf.entityType.value;
      const exists = document.querySelector(`tr[data-rule="${CSS.escape(rule.id)}"]`);
      act(exists ? "PUT" : "POST", exists ? `${base}/alerts/${enc(rule.id)}` : `${base}/alerts`, rule, reload);
    });
    const showSecret = (r) => {
      document.getElementById("secret-for").textContent = r.json.id;
      document.getElementById("secret-value").textContent = r.json.secret;
      document.getElementById("secret").hidden = false;
    };
    const hf = document.getElementById("hook-form");
    if (hf) hf.addEventListener("submit", (ev) => {
      ev.preventDefault();
      act("POST", `${base}/webhooks`, { id: hf.id.value.trim(), url: hf.url.value.trim() }, showSecret);
    });
    document.querySelectorAll(".rotate-hook").forEach((b) => b.addEventListener("click", () =>
      act("POST", `${base}/webhooks/${enc(b.dataset.id)}/secrets`, undefined, showSecret)));
    document.querySelectorAll(".retire-hook").forEach((b) => b.addEventListener("click", () =>
      act("DELETE", `${base}/webhooks/${enc(b.dataset.id)}/secrets/previous`, undefined, reload)));
    document.querySelectorAll(".delete-hook").forEach((b) => b.addEventListener("click", () =>
      act("DELETE", `${base}/webhooks/${enc(b.dataset.id)}`, undefined, reload)));
    document.querySelectorAll(".test-hook").forEach((b) => b.addEventListener("click", () =>
      act("POST", `${base}/webhooks/${enc(b.dataset.id)}/test`, undefined, refreshDeliveries)));
  }

  // Limits: save one value; a refusal says why.
  function wireLimits() {
    const status = document.getElementById("limit-status");
    const warning = document.getElementById("lower-warning");
    const isOperator = document.body.dataset.operator === "true";
    // Lowering a limit no ceiling covers is one-way for a customer's admin: asked first, in
    // the page (a button to confirm, one to keep it).
    const confirmLower = (text) => new Promise((resolve) => {
      document.getElementById("lower-warning-text").textContent = text;
      warning.hidden = false;
      const yes = document.getElementById("lower-confirm");
      const no = document.getElementById("lower-cancel");
      const done = (v) => () => { warning.hidden = true; yes.onclick = null; no.onclick = null; resolve(v); };
      yes.onclick = done(true);
      no.onclick = done(false);
      no.focus();
    });
    document.querySelectorAll(".save-limit").forEach((b) => b.addEventListener("click", async () => {
      const input = document.getElementById(`v-${b.dataset.id}`);
      const stored = JSON.parse(input.dataset.json);
      const limit = Object.assign({}, stored, { limit: Number(input.value) });
      if (!isOperator && input.dataset.covered !== "true" && limit.limit < stored.limit) {
        const ok = await confirmLower(`No ceiling covers ${limit.id}: once it is ${limit.limit}, you cannot raise it again yourself. Only restoring the configuration file's value (below, once saved) or the operator can. Lower it from ${stored.limit} to ${limit.limit}?`);
        if (!ok) { input.value = stored.limit; status.textContent = `${limit.id} kept at ${stored.limit}.`; return; }
      }
      const r = await api("PUT", `${base}/limits/${enc(limit.id)}`, limit);
      if (!r.ok) {
        showError(reason(r));
        // The field shows what is in force, not the value that was refused.
        input.value = stored.limit;
        status.textContent = `${limit.id} is still ${stored.limit}.`;
        return;
      }
      showError("");
      // Shown again from the server: the value in force, marked as changed over the file.
      window.location.assign(`${window.location.pathname}?saved=${enc(limit.id)}`);
    }));
    document.querySelectorAll(".restore").forEach((b) => b.addEventListener("click", async () => {
      const r = await api("DELETE", `${base}/overrides/${enc(b.dataset.kind)}/${enc(b.dataset.id)}`);
      if (!r.ok) { showError(reason(r)); return; }
      window.location.assign(`${window.location.pathname}?restored=${enc(b.dataset.kind)}:${enc(b.dataset.id)}`);
    }));
  }

  // Keys: make one (shown once) or revoke one.
  function wireKeys() {
    const kf = document.getElementById("key-form");
    if (kf) kf.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const body = { role: kf.role.value };
      if (kf.label.value.trim()) body.label = kf.label.value.trim();
      const r = await api("POST", `${base}/keys`, body);
      if (!r.ok) { showError(reason(r)); return; }
      showError("");
      document.getElementById("new-key-value").textContent = r.json.key;
      document.getElementById("new-key").hidden = false;
    });
    document.querySelectorAll(".revoke-key").forEach((b) => b.addEventListener("click", async () => {
      const r = await api("DELETE", `${base}/keys/${enc(b.dataset.id)}`);
      if (!r.ok) { showError(reason(r)); return; }
      window.location.reload();
    }));
  }

  // Live: the customer's usage stream, kept (the newest `kept` events) and paged, filtered in
  // the page; "who" in the hierarchy's order; after a restart it reconnects where it left off,
  // or says the session ended.
  function wireLive() {
    const status = document.getElementById("live-status");
    const signin = document.getElementById("live-signin");
    const table = document.getElementById("live");
    const tbody = table.querySelector("tbody");
    const empty = document.getElementById("live-empty");
    const range = document.getElementById("live-range");
    const newer = document.getElementById("live-newer");
    const older = document.getElementById("live-older");
    const form = document.getElementById("live-filter");
    const chain = (table.dataset.chain || "").split(",").filter(Boolean);
    let labels = {};
    try { labels = JSON.parse(table.dataset.labels || "{}"); } catch (_) { /* none */ }
    const kept = Number(table.dataset.kept) || 1000;
    const perPage = Number(table.dataset.perPage) || 25;
    const events = []; // newest first
    let page = 0;
    let lastId = null;
    let retry = 1000;
    const spend = new Set(["settled", "released", "expired", "committed", "ingested"]);
    const fmt = (n) => (typeof n === "number" ? n.toLocaleString("en") : (n ?? ""));

    const who = (a) => chain.filter((k) => a[k]).map((k) => a[k]).join(" › ");
    function entry(kind, d) {
      if (kind === "alert") {
        const x = d.data || {};
        return {
          kind: "alert", at: d.timestamp || new Date().toISOString(), event: `alert: ${d.type || ""}`,
          who: x.entityId || x.entity || "", model: "", units: fmt(x.currentUsage ?? x.used),
          outcome: x.limitId || x.limit || "",
        };
      }
      const a = d.attributes || {};
      const denied = d.kind === "denied";
      // A streamed call the gateway ended: cut for the client, or let run past a refusal.
      const by = (v) => (v === "sidecar-unreachable" ? "the sidecar being unreachable" : v);
      let outcome = denied ? `denied by ${a.deniedBy || "a limit"}` : "granted";
      let event = d.kind;
      if (a.cutBy) {
        event = `${d.kind} · stream cut`;
        outcome = `stream cut by ${by(a.cutBy)}`;
      } else if (a.finishedPast) {
        event = `${d.kind} · ran past`;
        outcome = `stream ran past ${by(a.finishedPast)}`;
      }
      return {
        kind: d.kind, at: d.at, event, who: who(a), model: a.model || "",
        units: denied ? `${fmt(d.asked ?? 0)} asked` : fmt(d.units),
        outcome, cut: Boolean(a.cutBy),
      };
    }
    function shown() {
      const q = form.q.value.trim().toLowerCase();
      const show = form.show.value;
      return events.filter((e) => {
        if (show === "denied" && e.kind !== "denied") return false;
        if (show === "cut" && !e.cut) return false;
        if (show === "spend" && !spend.has(e.kind)) return false;
        if (show === "alert" && e.kind !== "alert") return false;
        return !q || [e.who, e.model, e.event, e.outcome].join(" ").toLowerCase().includes(q);
      });
    }
    function draw() {
      const all = shown();
      const pages = Math.max(1, Math.ceil(all.length / perPage));
      page = Math.min(page, pages - 1);
      const start = page * perPage;
      tbody.replaceChildren();
      for (const e of all.slice(start, start + perPage)) {
        const tr = document.createElement("tr");
        tr.dataset.kind = e.cut ? "cut" : e.kind;
        for (const v of [e.at, e.event, e.who, e.model, e.units, e.outcome]) cell(tr, v);
        tbody.appendChild(tr);
      }
      empty.hidden = events.length > 0;
      range.textContent = all.length
        ? `${start + 1}–${Math.min(start + perPage, all.length)} of ${all.length}${all.length < events.length ? ` matching (${events.length} kept)` : ""}`
        : (events.length ? "nothing matches the filter" : "");
      newer.disabled = page === 0;
      older.disabled = page >= pages - 1;
    }
    function add(kind, d) {
      events.unshift(entry(kind, d));
      if (events.length > kept) events.length = kept;
      if (!form.paused.checked) draw();
    }
    newer.addEventListener("click", () => { page = Math.max(0, page - 1); draw(); });
    older.addEventListener("click", () => { page += 1; draw(); });
    form.addEventListener("input", () => { page = 0; draw(); });
    form.addEventListener("submit", (ev) => ev.preventDefault());

    // The stream answered with an error status: a 401/403 means the session is gone (a
    // restarted server keeps none), anything else is worth another try.
    async function refusal(url) {
      const ctl = new AbortController();
      try {
        const r = await fetch(url, { credentials: "same-origin", signal: ctl.signal });
        ctl.abort();
        return r.status;
      } catch (_) {
        return 0;
      }
    }
    function connect() {
      const url = `${base}/usage/stream${lastId ? `?after=${enc(lastId)}` : ""}`;
      const es = new EventSource(url);
      es.onopen = () => {
        retry = 1000;
        signin.hidden = true;
        status.textContent = "Live: new events appear at the top.";
      };
      es.onerror = async () => {
        if (es.readyState !== EventSource.CLOSED) { status.textContent = "Reconnecting…"; return; }
        es.close();
        const code = await refusal(url);
        if (code === 401 || code === 403) {
          status.textContent = "Not following: signed out.";
          signin.hidden = false;
          return;
        }
        status.textContent = `Reconnecting in ${Math.round(retry / 1000)} s…`;
        setTimeout(connect, retry);
        retry = Math.min(retry * 2, 30000);
      };
      const take = (kind) => (ev) => {
        if (ev.lastEventId) lastId = ev.lastEventId;
        add(kind, JSON.parse(ev.data));
      };
      es.addEventListener("usage", take("usage"));
      es.addEventListener("alert", take("alert"));
      es.addEventListener("gap", () => { status.textContent = "Live (some older events were missed while away)."; });
    }
    draw();
    connect();
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (page === "overview") {
      setInterval(refreshBars, 2000);
      document.getElementById("spend-form").addEventListener("change", refreshSpend);
      refreshSpend();
      setInterval(refreshSpend, 5000);
    }
    if (page === "usage") {
      document.getElementById("explore").addEventListener("change", refreshExplorer);
      refreshExplorer();
      setInterval(refreshExplorer, 3000);
    }
    if (page === "alerts") { wireAlerts(); refreshDeliveries(); setInterval(refreshDeliveries, 3000); }
    if (page === "limits") wireLimits();
    if (page === "customers") fillCustomers();
    if (page === "keys") wireKeys();
    if (page === "live") wireLive();
  });
})();
