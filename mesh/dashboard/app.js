// The mesh dashboard: renders the view of GET /v1/dashboard, then every "view" event of
// /v1/dashboard/stream (Server-Sent Events; the browser reconnects by itself).  No dependencies.
// Every value from the server goes into the page as text (textContent), never as markup.
"use strict";

(function () {
  const STATES = {
    running: { shape: "●", text: "running" },
    draining: { shape: "◐", text: "draining" },
    ejected: { shape: "✕", text: "ejected" },
    unhealthy: { shape: "▲", text: "unhealthy" },
  };

  const $ = (sel) => document.querySelector(sel);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, String(v));
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  function num(n) {
    if (n === null || n === undefined) return "–";
    if (n >= 1e6) return (n / 1e6).toFixed(n >= 1e7 ? 0 : 1) + "M";
    if (n >= 1e4) return (n / 1e3).toFixed(n >= 1e5 ? 0 : 1) + "k";
    return String(Math.round(n));
  }

  function rate(r) {
    if (r === null || r === undefined) return "–";
    if (r === 0) return "0";
    if (r < 10) return r.toFixed(1);
    return num(r);
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return (i === 0 ? String(Math.round(n)) : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
  }

  function bps(r) {
    return (r === null || r === undefined ? "– B" : bytes(r)) + "/s";
  }

  function seconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 120) return s.toFixed(s < 10 ? 1 : 0) + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    return Math.round(s / 3600) + " h";
  }

  function figure(label, value, field) {
    return el("span", { class: "fig", "data-field": field }, el("span", { class: "v" }, value), label ? " " : null, label ? el("span", { class: "k" }, label) : null);
  }

  function failedText(svc) {
    const parts = [];
    for (const [reason, n] of Object.entries(svc.failed || {})) {
      if (!n) continue;
      const r = svc.rates && svc.rates.failed_by_reason ? svc.rates.failed_by_reason[reason] : null;
      parts.push(reason.replace("_", " ") + " " + num(n) + (r ? " (" + rate(r) + "/s)" : ""));
    }
    return parts.length ? parts.join(", ") : "none";
  }

  function fact(label, value, id) {
    return [el("div", { class: "fact" }, el("dt", {}, label), el("dd", { id: id }, value))];
  }

  function renderFacts(v) {
    const dl = $("#facts");
    const items = [];
    const t = v.table;
    items.push(...fact("table", t ? "v" + t.version + (t.age_seconds !== null ? " · applied " + seconds(t.age_seconds) + " ago" : "") : "none yet", "f-table"));
    const d = v.discovery;
    let lag = "n/a (static config)";
    if (d) {
      lag = d.lag_count ? "mean " + seconds(d.lag_mean_seconds) + ", p99 ≤ " + seconds(d.lag_p99_le_seconds) + " (" + num(d.lag_count) + " changes)" : "no change seen yet";
    }
    const c = v.cluster;
    if (c) {
      items.push(...fact("role", c.role || "–", "f-role"));
      items.push(...fact("managers", (c.managers && c.managers.length) ? c.managers.join(", ") : (c.role === "manager" ? "this node" : "none"), "f-managers"));
      if (c.state) items.push(...fact("cluster state", "v" + c.state.version + " · " + c.state.digest, "f-state"));
      if (!d) lag = "n/a";
    }
    items.push(...fact("discovery lag", lag, "f-lag"));
    const active = v.services.reduce((a, s) => a + (s.http ? 0 : s.active), 0);
    const cps = v.services.reduce((a, s) => a + ((!s.http && s.rates && s.rates.accepted) || 0), 0);
    const bpsTotal = v.services.reduce((a, s) => a + ((s.rates && s.rates.bytes) || 0), 0);
    items.push(...fact("active connections", num(active), "f-active"));
    items.push(...fact("new connections/s", rate(cps), "f-cps"));
    items.push(...fact("bytes/s", bps(bpsTotal), "f-bps"));
    const https = v.services.filter((s) => s.http);
    if (https.length) {
      const rps = https.reduce((a, s) => a + ((s.rates && s.rates.requests) || 0), 0);
      items.push(...fact("http requests/s", rate(rps), "f-rps"));
    }
    if (v.processes > 1) items.push(...fact("processes", String(v.processes), "f-procs"));
    if (v.fd_exhausted) items.push(...fact("fd exhausted", num(v.fd_exhausted), "f-fd"));
    dl.replaceChildren(...items);
  }

  function nodeHeader(n, v) {
    const info = [];
    if (n.self) info.push("this node");
    if (n.role) info.push(n.role);
    if (n.reachable === false) info.push("unreachable");
    const cls = "cell head node" + (n.reachable === false ? " down" : "");
    return el("div", { class: cls, role: "columnheader", "data-node": n.id },
      el("span", { class: "node-id" }, n.id),
      info.length ? el("span", { class: "node-info" }, info.join(" · ")) : null,
      n.error ? el("span", { class: "node-err" }, n.error) : null);
  }

  function replicaItem(rep) {
    const st = STATES[rep.state] || { shape: "?", text: rep.state };
    const rates = rep.rates || {};
    return el("li", { class: "rep s-" + rep.state + (rep.via ? " remote" : ""), "data-replica": rep.id, "data-state": rep.state, "data-node": rep.node },
      el("div", { class: "rep-head" },
        el("span", { class: "rep-shape s-" + rep.state, "aria-hidden": "true" }, st.shape),
        el("span", { class: "rep-state" }, st.text),
        el("code", { class: "rep-id", title: rep.id + " " + rep.address }, rep.id.length > 16 ? rep.id.slice(0, 12) + "…" : rep.id),
        rep.via ? el("span", { class: "tag-remote", title: "through the tunnel of " + rep.via }, "↗ remote") : null,
        rep.listed ? null : el("span", { class: "tag-gone" }, "removed")),
      el("div", { class: "figs" },
        figure("active", num(rep.active), "active"),
        figure("conn/s", rate(rates.connections), "cps"),
        figure("", bps(rates.bytes), "bps"),
        figure("total", num(rep.connections), "connections"),
        rep.ejections ? figure("ejections", num(rep.ejections), "ejections") : null));
  }

  // An http route: requests/s, requests in flight, requests by status class (total and per second), and
  // the host/path rule that sends requests to it.
  function httpBlock(s) {
    const h = s.http;
    const r = s.rates || {};
    const cr = r.by_class || {};
    const classes = [];
    for (const cls of ["1xx", "2xx", "3xx", "4xx", "5xx"]) {
      const n = h.by_class[cls] || 0;
      if (!n) continue;
      classes.push(el("span", { class: "cls c" + cls[0], "data-class": cls }, cls + " " + num(n) + (cr[cls] ? " (" + rate(cr[cls]) + "/s)" : "")));
    }
    const rule = "hosts " + (h.hosts.length ? h.hosts.join(", ") : "any") + " · paths " + (h.paths.length ? h.paths.join(", ") : "any");
    return el("div", { class: "http" },
      el("div", { class: "figs" },
        figure("req/s", rate(r.requests), "rps"),
        figure("in flight", num(h.active), "requests-active"),
        figure("requests", num(h.requests), "requests"),
        h.retries ? figure("retries", num(h.retries), "http-retries") : null),
      el("div", { class: "classes", "data-field": "classes" }, ...(classes.length ? classes : [el("span", { class: "none" }, "no request yet")])),
      el("div", { class: "rule", "data-field": "rule" }, rule));
  }

  function renderGrid(v) {
    const grid = $("#grid");
    const nodes = v.nodes;
    grid.style.setProperty("--nodes", String(Math.max(1, nodes.length)));
    const rows = [];
    rows.push(el("div", { class: "row head", role: "row" },
      el("div", { class: "cell head svc", role: "columnheader" }, "service"),
      ...nodes.map((n) => nodeHeader(n, v))));
    for (const s of v.services) {
      const r = s.rates || {};
      const key = s.name + ":" + s.port;
      const up = s.listening;
      const summary = el("div", { class: "cell svc", role: "rowheader" },
        el("div", { class: "svc-name" }, el("strong", {}, s.name), " ",
          el("span", { class: "svc-port" }, ":" + (s.bound_port || s.port) + "/" + s.protocol),
          el("span", { class: "lst " + (up ? "up" : "down") }, up ? "▲ up" : "▼ down")),
        el("div", { class: "figs" },
          // an http route counts requests, not client connections: its figures are in httpBlock
          s.http ? null : figure("active", num(s.active), "active"),
          s.http ? null : figure("conn/s", rate(r.accepted), "cps"),
          figure("", bps(r.bytes), "bps"),
          figure("healthy", s.healthy + "/" + s.endpoints, "healthy")),
        s.http ? httpBlock(s) : null,
        el("div", { class: "failed" + (Object.values(s.failed).some((n) => n) ? " some" : "") , "data-field": "failed" }, "failed: " + failedText(s)));
      const cells = nodes.map((n) => {
        const reps = s.replicas.filter((rep) => rep.node === n.id);
        const ing = s.ingress ? s.ingress[n.id] : null;
        return el("div", { class: "cell reps", role: "cell", "data-node": n.id, "data-label": n.id },
          reps.length ? el("ul", {}, ...reps.map(replicaItem)) : el("span", { class: "none" }, "no replica"),
          ing && v.scope === "cluster" ? el("div", { class: "ingress" }, "accepted here " + num(ing.accepted) + (ing.rate ? " (" + rate(ing.rate) + "/s)" : "")) : null);
      });
      rows.push(el("div", { class: "row", role: "row", "data-service": key }, summary, ...cells));
    }
    grid.replaceChildren(...rows);
    $("#empty").hidden = v.services.length > 0;
  }

  function renderListeners(v) {
    const body = $("#listeners tbody");
    body.replaceChildren(...v.listeners.map((l) => el("tr", { "data-listener": l.service + ":" + l.port, "data-up": l.listening ? "up" : "down" },
      el("td", {}, String(l.bound_port || l.port) + (l.bound_port && l.bound_port !== l.port ? " (configured " + l.port + ")" : "")),
      el("td", {}, l.protocol),
      el("td", {}, l.service),
      el("td", {}, l.listen_host),
      el("td", { class: l.listening ? "up" : "down" }, l.listening ? "▲ up" : "▼ down"))));
  }

  function render(v) {
    $("#node").textContent = v.node;
    $("#scope").textContent = v.scope === "cluster" ? "· whole cluster (" + v.nodes.length + " nodes)" : "";
    renderFacts(v);
    renderGrid(v);
    renderListeners(v);
    document.body.dataset.seq = String((Number(document.body.dataset.seq) || 0) + 1);
  }

  function setLive(state, text) {
    const live = $("#live");
    live.dataset.live = state;
    live.querySelector(".text").textContent = text;
  }

  let lastAt = 0;
  function onView(text) {
    let v;
    try { v = JSON.parse(text); } catch (e) { return; }
    lastAt = Date.now();
    render(v);
    setLive("live", "live");
  }

  setInterval(() => {
    if (lastAt && Date.now() - lastAt > 5000) setLive("stale", "no update for " + Math.round((Date.now() - lastAt) / 1000) + " s");
  }, 1000);

  fetch("../v1/dashboard", { cache: "no-store" })
    .then((r) => (r.ok ? r.text() : Promise.reject(new Error("HTTP " + r.status))))
    .then(onView)
    .catch(() => setLive("stale", "cannot read /v1/dashboard"));

  if (window.EventSource) {
    const es = new EventSource("../v1/dashboard/stream");
    es.addEventListener("view", (e) => onView(e.data));
    es.addEventListener("error", () => setLive("stale", "reconnecting…"));
  } else {
    setInterval(() => fetch("../v1/dashboard", { cache: "no-store" }).then((r) => r.text()).then(onView).catch(() => {}), 1000);
  }
})();
