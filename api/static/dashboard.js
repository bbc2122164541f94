// inferq dashboard: polls GET /dashboard/data every two seconds and draws it. Hand-written, no dependencies.
// Every value from the service reaches the page through textContent or an attribute, never as HTML.
"use strict";

(function () {
  const KEY_STORAGE = "inferq.dashboard.apiKey";
  const POLL_MS = 2000;
  const COLORS = ["#2f6fde", "#1f9d55", "#c98a12", "#7b52c9", "#d64545", "#0f9fb0", "#b3477d"];
  const SVG_NS = "http://www.w3.org/2000/svg";

  let apiKey = localStorage.getItem(KEY_STORAGE) || "";
  let timer = null;
  let last = null;  // the newest data, redrawn on resize

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ---- formatting ----------------------------------------------------------------------------------------------
  function seconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1) return `${Math.round(s * 1000)} ms`;
    if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${String(Math.round(s % 60)).padStart(2, "0")}s`;
    return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
  }

  function ago(t, now) {
    if (!t) return "–";
    const s = Math.max(0, now - t);
    return s < 60 ? `${Math.round(s)}s ago` : `${seconds(s)} ago`;
  }

  function rate(v) {
    if (v >= 1000) return `${(v / 1000).toFixed(1)}k`;
    return v >= 100 ? v.toFixed(0) : v.toFixed(1);
  }

  function percent(fraction) {
    return fraction > 0 && fraction < 0.001 ? "<0.1%" : `${(fraction * 100).toFixed(1)}%`;
  }

  function shortId(id) {
    return id.length > 18 ? `${id.slice(0, 12)}…${id.slice(-4)}` : id;
  }

  function meter(fraction, label, warnAbove) {
    const pct = Math.max(0, Math.min(1, fraction || 0)) * 100;
    const fill = el("div", { class: "fill" + (warnAbove !== undefined && fraction > warnAbove ? " high" : "") });
    fill.style.width = `${pct.toFixed(1)}%`;
    return el("div", { class: "meter" }, el("div", { class: "track" }, fill), el("span", { class: "value" }, label));
  }

  function fillBody(table, rows, columns, emptyText) {
    const body = table.tBodies[0];
    if (!rows.length) {
      body.replaceChildren(el("tr", {}, el("td", { class: "empty", colspan: columns }, emptyText)));
      return;
    }
    body.replaceChildren(...rows);
  }

  // ---- panels --------------------------------------------------------------------------------------------------
  function renderWorkers(workers) {
    const rows = workers.map((w) => {
      const max = w.max_num_seqs || 0;
      const kv = w.kv_cache_usage;
      return el("tr", { "data-worker": w.worker_id },
        el("td", { class: "model name", title: w.model }, w.model),
        el("td", { class: "mono ellipsis", title: w.worker_id }, w.worker_id),
        el("td", { class: "device" }, w.device || "–"),
        el("td", {}, w.dtype || "–"),
        el("td", { class: "low-bit" }, w.load_in_low_bit || "none"),
        el("td", { class: "num batch-size" }, meter(max ? w.running / max : 0, `${w.running} / ${max || "?"}`)),
        el("td", { class: "num" }, w.waiting),
        el("td", { class: "kv" }, kv === null ? "–" : meter(kv, percent(kv), 0.9)),
        el("td", { class: "num muted" }, `${w.seen_s_ago.toFixed(0)}s ago`));
    });
    fillBody($("workers"), rows, 9, "No live worker. Start one with `inferq worker --model …`.");
  }

  function renderQueues(queues) {
    const rows = queues.map((q) => el("tr", { "data-model": q.model },
      el("td", { class: "name", title: q.model }, q.model), el("td", { class: "num" }, q.workers),
      el("td", { class: "num" }, q.interactive_queued), el("td", { class: "num" }, q.interactive_running),
      el("td", { class: "num" }, q.bulk_pending), el("td", { class: "num" }, q.bulk_in_flight)));
    fillBody($("queues"), rows, 6, "No model announced yet.");
  }

  function renderBatches(batches) {
    const box = $("batches");
    if (!batches.length) {
      box.replaceChildren(el("div", { class: "empty-note" }, "No batches yet (POST /v1/batches)."));
      return;
    }
    box.replaceChildren(...batches.map((b) => {
      const bar = el("div", {
        class: "progress" + (b.total ? "" : " indeterminate"), role: "progressbar",
        "aria-valuemin": 0, "aria-valuemax": b.total, "aria-valuenow": b.done,
        "data-completed": b.completed, "data-failed": b.failed, "data-total": b.total,
      });
      if (b.total) {
        for (const part of ["completed", "failed"]) {
          const segment = el("div", { class: part });
          segment.style.width = `${(100 * b[part] / b.total).toFixed(2)}%`;
          bar.append(segment);
        }
      }
      const counts = el("div", { class: "counts" },
        el("strong", {}, b.completed), " completed · ",
        el("span", { class: b.failed ? "failed" : "" }, b.failed), " failed · ",
        el("strong", {}, b.total || "?"), " total");
      const active = b.status === "validating" || b.status === "in_progress";
      const timing = active ? `ETA ${b.eta_s !== null ? seconds(b.eta_s) : "–"}`
        : (b.elapsed_s ? `took ${seconds(b.elapsed_s)}` : null);
      const meta = [
        b.model ? `model ${b.model}` : null,
        b.endpoint,
        b.total ? `${(100 * b.done / b.total).toFixed(1)}% done` : "queuing lines…",
        b.lines_per_s ? `${rate(b.lines_per_s)} lines/s` : null,
        timing,
      ].filter(Boolean).join(" · ");
      return el("div", { class: "batch", "data-batch": b.id, "data-status": b.status },
        el("div", { class: "title" }, el("span", { class: `badge ${b.status}` }, b.status.replace("_", " ")),
          el("span", { class: "mono", title: b.id }, b.id)),
        counts, bar, el("div", { class: "meta" }, meta));
    }));
  }

  function renderJobs(jobs, now) {
    const rows = jobs.map((j) => el("tr", { "data-job": j.id, "data-status": j.status },
      el("td", { class: "mono", title: j.id }, shortId(j.id)),
      el("td", { class: "name", title: j.model }, j.model), el("td", { class: "muted" }, j.endpoint),
      el("td", {}, el("span", { class: `badge ${j.status}` }, j.status)),
      el("td", { class: "num muted" }, ago(j.created_at, now)),
      el("td", { class: "num" }, seconds(j.queued_s)),
      el("td", { class: "num" }, seconds(j.ttft_s)),
      el("td", { class: "num" + (j.finished ? "" : " muted") }, seconds(j.latency_s)),
      el("td", { class: "num" }, j.completion_tokens ?? "–")));
    fillBody($("jobs"), rows, 9, "No jobs yet.");
  }

  function niceMax(v) {
    if (v <= 0) return 10;
    const exp = Math.pow(10, Math.floor(Math.log10(v)));
    for (const step of [1, 2, 2.5, 5, 10]) if (v <= step * exp) return step * exp;
    return 10 * exp;
  }

  function renderThroughput(t, now) {
    const plot = $("throughput");
    const width = Math.max(320, plot.clientWidth || 600);
    const height = Math.max(160, plot.clientHeight || 220);
    const pad = { left: 48, right: 12, top: 10, bottom: 24 };
    const w = width - pad.left - pad.right, h = height - pad.top - pad.bottom;
    plot.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const names = Object.keys(t.models);
    const series = names.map((name, i) => ({ name, values: t.models[name], color: COLORS[i % COLORS.length] }));
    if (series.length > 1) series.unshift({ name: "all models", values: t.total, color: "#1d2330" });
    const peak = Math.max(0, ...t.total);
    const top = niceMax(peak * 1.1);
    const n = t.times.length;
    const x = (i) => pad.left + (n > 1 ? (i / (n - 1)) * w : w);
    const y = (v) => pad.top + h - (v / top) * h;
    const nodes = [];
    for (let k = 0; k <= 4; k++) {
      const v = (top / 4) * k;
      nodes.push(svg("line", { class: "grid", x1: pad.left, x2: pad.left + w, y1: y(v), y2: y(v) }));
      nodes.push(svg("text", { x: pad.left - 6, y: y(v) + 4, "text-anchor": "end" }, k === 0 ? "0" : rate(v)));
    }
    const windowMin = Math.round(t.window_s / 60);
    for (let m = windowMin; m >= 0; m -= windowMin >= 10 ? 2 : 1) {
      const i = Math.max(0, n - 1 - (m * 60) / t.bucket_s);
      const anchor = m === 0 ? "end" : m === windowMin ? "start" : "middle";
      nodes.push(svg("text", { x: x(i), y: height - 6, "text-anchor": anchor }, m === 0 ? "now" : `−${m} min`));
    }
    nodes.push(svg("line", { class: "axis", x1: pad.left, x2: pad.left + w, y1: y(0), y2: y(0) }));
    for (const s of series) {
      const points = s.values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`);
      if (!points.length) continue;
      const d = "M" + points.join(" L");
      if (s.name !== "all models") {
        const area = `${d} L${x(n - 1).toFixed(1)},${y(0)} L${x(0).toFixed(1)},${y(0)} Z`;
        nodes.push(svg("path", { class: "area", fill: s.color, d: area }));
      }
      nodes.push(svg("path", {
        class: "series", stroke: s.color, d, "data-series": s.name, "data-points": points.length,
        "data-nonzero": s.values.filter((v) => v > 0).length,
      }));
    }
    plot.replaceChildren(...nodes);
    const latest = n ? t.total[n - 1] : 0;
    $("tps-now").textContent = `${rate(latest)} tok/s now · peak ${rate(peak)}`;
    const legend = series.length ? series : [{ name: "no tokens generated yet", color: "#c5cad3" }];
    $("throughput-legend").replaceChildren(...legend.map((s) => {
      const swatch = el("span", { class: "swatch" });
      swatch.style.background = s.color;  // CSSOM, which the page's style-src 'self' allows
      return el("span", {}, swatch, s.name);
    }));
  }

  function render(data) {
    last = data;
    renderWorkers(data.workers);
    renderQueues(data.queues);
    renderThroughput(data.throughput, data.now);
    renderBatches(data.batches);
    renderJobs(data.recent_jobs, data.now);
  }

  // ---- polling and the key -------------------------------------------------------------------------------------
  function setStatus(text, kind) {
    const status = $("status");
    status.textContent = text;
    status.className = "status" + (kind ? ` ${kind}` : "");
  }

  function askForKey(message, isError) {
    $("key-form").hidden = false;
    const note = $("key-message");
    note.textContent = message;
    note.className = "key-message" + (isError ? " error" : "");
    $("key-input").focus();
  }

  async function poll() {
    clearTimeout(timer);
    timer = null;
    let response;
    try {
      response = await fetch("/dashboard/data", {
        headers: apiKey ? { Authorization: `Bearer ${apiKey}` } : {}, cache: "no-store",
      });
    } catch (err) {
      setStatus("cannot reach the API — retrying", "error");
      timer = setTimeout(poll, POLL_MS);
      return;
    }
    if (response.status === 401) {
      let message = "This API needs a key.";
      try { message = (await response.json()).error.message; } catch (err) { /* not JSON */ }
      setStatus("no valid API key", "error");
      askForKey(apiKey ? `The stored key was refused: ${message}` : "Enter an API key to see the dashboard.", !!apiKey);
      return;  // until a key is entered
    }
    if (!response.ok) {
      let message = `HTTP ${response.status}`;
      try { message += `: ${(await response.json()).error.message}`; } catch (err) { /* not JSON */ }
      setStatus(message, "error");
    } else {
      render(await response.json());
      setStatus(`live · updated ${new Date().toLocaleTimeString()}`, "live");
    }
    timer = setTimeout(poll, POLL_MS);
  }

  function start() {
    $("key-button").addEventListener("click", () => {
      const form = $("key-form");
      if (form.hidden) askForKey("The key is kept in this browser's localStorage only.", false);
      else form.hidden = true;
    });
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      apiKey = $("key-input").value.trim();
      if (apiKey) localStorage.setItem(KEY_STORAGE, apiKey);
      else localStorage.removeItem(KEY_STORAGE);
      $("key-input").value = "";
      $("key-form").hidden = true;
      setStatus("connecting…");
      poll();
    });
    $("key-forget").addEventListener("click", () => {
      apiKey = "";
      localStorage.removeItem(KEY_STORAGE);
      $("key-input").value = "";
      poll();
    });
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => { if (last) renderThroughput(last.throughput, last.now); }, 100);
    });
    poll();
  }

  start();
})();
