// Vigil dashboard: polls the daemon's REST API every second, draws its own charts on
// <canvas>, follows the event stream over fetch() (so the bearer token travels in a
// header, never in a URL) and drives pause / resume / stop. No framework, no CDN.
"use strict";

(function () {
  const POLL_MS = 1000;
  const MAX_POINTS = 120; // two minutes at one sample a second
  const MAX_EVENTS = 300;
  const TOKEN_KEY = "vigil-token";

  const $ = (id) => document.getElementById(id);

  // ---- state ---------------------------------------------------------------------
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let vms = new Map(); // id -> { vm, figures, prev, rates, series }
  let selected = null;
  let pollTimer = null;
  let eventsAbort = null;
  let eventsBackoff = 1000;
  let needLogin = false;

  // ---- HTTP ----------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function headers(extra) {
    const h = Object.assign({ Accept: "application/json" }, extra || {});
    if (token) h.Authorization = "Bearer " + token;
    return h;
  }

  async function api(method, path, body) {
    const init = { method, headers: headers(), cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, "the daemon cannot be reached (" + e.message + ")");
    }
    const text = await res.text();
    if (res.status === 401) {
      askToken(token ? "The token was refused." : "");
      throw new ApiError(401, "unauthorized: a valid bearer token is needed");
    }
    if (!res.ok) {
      let msg = text;
      try {
        const j = JSON.parse(text);
        msg = j.fault_message || j.error || j.message || text;
      } catch (_) { /* plain text body */ }
      throw new ApiError(res.status, res.status + " " + res.statusText + (msg ? ": " + msg : ""));
    }
    if (!text) return null;
    try {
      return JSON.parse(text);
    } catch (_) {
      return text;
    }
  }

  // ---- what the daemon says, read tolerantly -------------------------------------
  function vmList(body) {
    if (Array.isArray(body)) return body;
    if (body && Array.isArray(body.vms)) return body.vms;
    return [];
  }

  function machineConfig(vm) {
    const c = vm.config || {};
    return vm.machine_config || vm["machine-config"] || c["machine-config"] || c.machine_config || {};
  }

  function sumValues(o) {
    let s = 0;
    if (o && typeof o === "object") {
      for (const v of Object.values(o)) if (typeof v === "number") s += v;
    }
    return s;
  }

  // Key figures of one vigil-metrics snapshot: counters (exits, cpu_ns, bytes) and
  // gauges (rss, uptime). Missing fields stay null and show as "–".
  function figures(m) {
    if (!m || typeof m !== "object") return null;
    const f = { exits: null, cpuNs: null, rss: null, saved: null, ratio: null, disk: null, net: null, uptimeS: null };
    const vcpus = Array.isArray(m.vcpus) ? m.vcpus : null;
    if (vcpus) {
      f.exits = vcpus.reduce((a, v) => a + sumValues(v.exits), 0);
      let cpu = 0, any = false;
      for (const v of vcpus) {
        const ns = typeof v.cpu_ns === "number" ? v.cpu_ns : v.guest_ns;
        if (typeof ns === "number") { cpu += ns; any = true; }
      }
      if (any) f.cpuNs = cpu;
    } else if (m.exits !== undefined) {
      f.exits = typeof m.exits === "number" ? m.exits : sumValues(m.exits);
    }
    if (typeof m.cpu_ns === "number") f.cpuNs = m.cpu_ns;
    if (m.process && typeof m.process.cpu_ns === "number") f.cpuNs = m.process.cpu_ns;
    const mem = m.memory || m.process || {};
    f.rss = num(mem.rss_bytes, m.rss_bytes, m.memory_rss_bytes);
    // The memory-compression pager's saving, when it is on.
    const mc = m.memory_compression;
    if (mc && mc.enabled) {
      f.saved = num(mc.bytes_saved);
      f.ratio = num(mc.ratio_percent);
    }
    if (Array.isArray(m.devices)) {
      let disk = 0, net = 0;
      for (const d of m.devices) {
        const b = (d.bytes_in || 0) + (d.bytes_out || 0);
        if (d.kind === "block") disk += b;
        else if (d.kind === "net") net += b;
      }
      f.disk = disk;
      f.net = net;
    }
    f.uptimeS = num(m.uptime_s, m.uptime_ns !== undefined ? m.uptime_ns / 1e9 : undefined,
      m.uptime_ms !== undefined ? m.uptime_ms / 1e3 : undefined);
    return f;
  }

  function num(...xs) {
    for (const x of xs) if (typeof x === "number" && isFinite(x)) return x;
    return null;
  }

  // Rates from two samples' counter deltas; the interval is the VM's own uptime delta
  // where both samples carry it (immune to the browser's timer jitter).
  function rates(prev, cur) {
    if (!prev || !cur) return null;
    let dt = null;
    if (prev.f.uptimeS !== null && cur.f.uptimeS !== null && cur.f.uptimeS > prev.f.uptimeS) {
      dt = cur.f.uptimeS - prev.f.uptimeS;
    } else {
      dt = (cur.t - prev.t) / 1000;
    }
    if (!(dt > 0)) return null;
    const d = (k) => (prev.f[k] === null || cur.f[k] === null ? null : Math.max(0, cur.f[k] - prev.f[k]) / dt);
    const cpu = d("cpuNs");
    const disk = d("disk"), net = d("net");
    return {
      exits: d("exits"),
      cpu: cpu === null ? null : cpu / 1e7, // ns per s -> percent of one CPU
      disk, net,
      io: disk === null && net === null ? null : (disk || 0) + (net || 0),
    };
  }

  // ---- formatting ----------------------------------------------------------------
  const dash = "\u2013";
  function fmtBytes(b) {
    if (b === null || b === undefined) return dash;
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
    return (i === 0 ? b.toFixed(0) : b.toFixed(1)) + " " + u[i];
  }
  // "12.0 MiB (3.9x)": bytes saved and the pool's ratio, "off" without the pager.
  function fmtSaved(b, ratioPct) {
    if (b === null || b === undefined) return "off";
    return fmtBytes(b) + (typeof ratioPct === "number" ? " (" + (ratioPct / 100).toFixed(1) + "\u00d7)" : "");
  }
  function fmtRate(x) { return x === null || x === undefined ? dash : fmtBytes(x) + "/s"; }
  function fmtNum(x) {
    if (x === null || x === undefined) return dash;
    if (x >= 1e6) return (x / 1e6).toFixed(1) + "M";
    if (x >= 1e4) return (x / 1e3).toFixed(1) + "k";
    return x >= 100 ? x.toFixed(0) : x.toFixed(1);
  }
  function fmtPct(x) { return x === null || x === undefined ? dash : x.toFixed(1) + " %"; }
  function fmtUptime(s) {
    if (s === null || s === undefined) return dash;
    s = Math.floor(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return (h ? h + "h " : "") + (h || m ? m + "m " : "") + sec + "s";
  }
  function fmtMem(mib) { return mib === undefined || mib === null ? dash : mib + " MiB"; }

  // ---- polling -------------------------------------------------------------------
  async function poll() {
    clearTimeout(pollTimer);
    try {
      const list = vmList(await api("GET", "vms"));
      const seen = new Set();
      await Promise.all(list.map(async (vm) => {
        if (!vm || vm.id === undefined) return;
        const id = String(vm.id);
        seen.add(id);
        let entry = vms.get(id);
        if (!entry) {
          entry = { vm, f: null, prev: null, rates: null, series: [] };
          vms.set(id, entry);
        }
        entry.vm = vm;
        let m = vm.metrics || null;
        if (!m && isLive(stateOf(vm))) {
          try { m = await api("GET", "vms/" + encodeURIComponent(id) + "/metrics"); } catch (e) {
            if (e.status === 401) throw e;
            m = null; // a VM that just went away: keep the row, skip the sample
          }
        }
        const f = figures(m);
        if (f) {
          const cur = { t: performance.now(), f };
          const r = rates(entry.prev, cur);
          entry.f = f;
          entry.prev = cur;
          if (r) {
            entry.rates = r;
            entry.series.push({ t: Date.now(), exits: r.exits, cpu: r.cpu, rss: f.rss, io: r.io });
            if (entry.series.length > MAX_POINTS) entry.series.shift();
          }
        } else if (!isLive(stateOf(vm))) {
          entry.rates = null;
        }
      }));
      for (const id of [...vms.keys()]) if (!seen.has(id)) vms.delete(id);
      if (selected !== null && !vms.has(selected)) select(null);
      if (selected === null && vms.size > 0) select(vms.keys().next().value);
      setConn(true, "Live \u00b7 " + new Date().toLocaleTimeString());
      render();
    } catch (e) {
      if (e.status === 401) { setConn(false, "Token needed"); return; }
      setConn(false, "Disconnected: " + e.message);
    }
    if (!needLogin) pollTimer = setTimeout(poll, POLL_MS);
  }

  // The daemon says "running", "paused", ...; the page shows and compares "Running".
  function stateOf(vm) {
    const s = String((vm && vm.state) || "unknown");
    return s.charAt(0).toUpperCase() + s.slice(1).toLowerCase();
  }

  function isLive(state) {
    return state === "Running" || state === "Paused" || state === "Starting" || state === "Stopping";
  }

  function setConn(ok, text) {
    const c = $("conn");
    c.textContent = text;
    c.classList.toggle("live", ok);
    c.classList.toggle("down", !ok);
  }

  // ---- rendering -----------------------------------------------------------------
  function render() {
    const body = $("vm-rows");
    const ids = [...vms.keys()].sort();
    $("no-vms").hidden = ids.length > 0;
    $("vm-count").textContent = "(" + ids.length + ")";
    const rows = new Map([...body.rows].map((r) => [r.dataset.vmId, r]));
    for (const [id, r] of rows) if (!vms.has(id)) r.remove();
    ids.forEach((id, i) => {
      let row = rows.get(id);
      if (!row) row = newRow(id);
      if (body.rows[i] !== row) body.insertBefore(row, body.rows[i] || null);
      fillRow(row, vms.get(id));
    });
    renderDetail();
  }

  function newRow(id) {
    const row = document.createElement("tr");
    row.dataset.vmId = id;
    for (let i = 0; i < 11; i++) row.appendChild(document.createElement("td"));
    for (let i = 2; i < 11; i++) row.cells[i].className = "num";
    const b = document.createElement("button");
    b.type = "button";
    b.className = "vm-link";
    b.textContent = id;
    b.setAttribute("aria-label", "Show VM " + id);
    b.addEventListener("click", () => select(id));
    row.cells[0].appendChild(b);
    const st = document.createElement("span");
    st.className = "state";
    row.cells[1].appendChild(st);
    return row;
  }

  function fillRow(row, e) {
    const vm = e.vm, mc = machineConfig(vm), r = e.rates || {}, f = e.f || {};
    const state = stateOf(vm);
    row.dataset.state = state;
    row.classList.toggle("selected", row.dataset.vmId === selected);
    const st = row.cells[1].firstChild;
    st.textContent = state;
    st.className = "state state-" + state;
    const live = isLive(state);
    const cells = [
      String(vm.vcpus ?? mc.vcpu_count ?? dash),
      fmtMem(vm.memory_mib ?? mc.mem_size_mib),
      live ? fmtUptime(f.uptimeS ?? vm.uptime_s) : dash,
      live ? fmtNum(r.exits) : dash,
      live ? fmtPct(r.cpu) : dash,
      live ? fmtBytes(f.rss) : dash,
      live ? fmtSaved(f.saved, f.ratio) : dash,
      live ? fmtRate(r.disk) : dash,
      live ? fmtRate(r.net) : dash,
    ];
    cells.forEach((text, i) => {
      if (row.cells[i + 2].textContent !== text) row.cells[i + 2].textContent = text;
    });
  }

  function select(id) {
    selected = id;
    render();
    renderEvents();
  }

  function renderDetail() {
    const d = $("detail");
    const e = selected === null ? null : vms.get(selected);
    d.hidden = !e;
    if (!e) return;
    const state = stateOf(e.vm);
    $("detail-id").textContent = selected;
    const st = $("detail-state");
    st.textContent = state;
    st.className = "state state-" + state;
    $("btn-pause").disabled = state !== "Running";
    $("btn-resume").disabled = state !== "Paused";
    $("btn-stop").disabled = !(state === "Running" || state === "Paused" || state === "Starting");
    drawChart($("chart-exits"), e.series, "exits", fmtNum);
    drawChart($("chart-cpu"), e.series, "cpu", (x) => (x > 0 && x < 10 ? x.toFixed(1) : x.toFixed(0)) + "%");
    drawChart($("chart-rss"), e.series, "rss", fmtBytes);
    drawChart($("chart-io"), e.series, "io", fmtRate);
  }

  // ---- charts: a time series on a canvas -------------------------------------------
  function niceMax(x) {
    if (!(x > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(x)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= x) return m * p;
    return 10 * p;
  }

  function drawChart(canvas, series, key, fmt) {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(50, canvas.clientWidth), h = Math.max(50, canvas.clientHeight);
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const pts = series.filter((p) => p[key] !== null && p[key] !== undefined);
    canvas.dataset.points = String(pts.length);
    const styles = getComputedStyle(document.documentElement);
    const muted = styles.getPropertyValue("--muted").trim() || "#888";
    const line = styles.getPropertyValue("--line").trim() || "#333";
    const accent = styles.getPropertyValue("--accent").trim() || "#4fb3ff";
    const max = niceMax(Math.max(0, ...pts.map((p) => p[key])));
    ctx.font = "11px system-ui, sans-serif";
    const labels = [0, 1, 2, 3, 4].map((i) => fmt((max * i) / 4));
    const padL = 12 + Math.max(...labels.map((l) => ctx.measureText(l).width)), padR = 8, padT = 8, padB = 18;
    const pw = w - padL - padR, ph = h - padT - padB;
    ctx.fillStyle = muted;
    ctx.strokeStyle = line;
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = padT + ph - (ph * i) / 4;
      ctx.beginPath();
      ctx.moveTo(padL, Math.round(y) + 0.5);
      ctx.lineTo(w - padR, Math.round(y) + 0.5);
      ctx.stroke();
      if (pts.length > 0) ctx.fillText(labels[i], padL - 6, y);
    }
    ctx.textAlign = "left";
    ctx.textBaseline = "alphabetic";
    const span = MAX_POINTS; // seconds shown
    ctx.fillText("\u2212" + span + " s", padL, h - 4);
    ctx.textAlign = "right";
    ctx.fillText("now", w - padR, h - 4);
    if (pts.length === 0) {
      ctx.textAlign = "center";
      ctx.fillText("waiting for samples\u2026", padL + pw / 2, padT + ph / 2);
      canvas.setAttribute("aria-label", canvas.getAttribute("aria-label").split(":")[0] + ": no samples yet");
      return;
    }
    const now = Date.now();
    const x = (t) => padL + pw - ((now - t) / 1000 / span) * pw;
    const y = (v) => padT + ph - (v / max) * ph;
    ctx.save();
    ctx.beginPath();
    ctx.rect(padL, padT, pw, ph);
    ctx.clip();
    ctx.beginPath();
    pts.forEach((p, i) => (i ? ctx.lineTo(x(p.t), y(p[key])) : ctx.moveTo(x(p.t), y(p[key]))));
    ctx.strokeStyle = accent;
    ctx.lineWidth = 2;
    ctx.stroke();
    ctx.lineTo(x(pts[pts.length - 1].t), padT + ph);
    ctx.lineTo(x(pts[0].t), padT + ph);
    ctx.closePath();
    ctx.globalAlpha = 0.15;
    ctx.fillStyle = accent;
    ctx.fill();
    ctx.restore();
    const last = fmt(pts[pts.length - 1][key]);
    ctx.textAlign = "right";
    ctx.fillStyle = accent;
    ctx.font = "bold 12px system-ui, sans-serif";
    ctx.fillText(last, w - padR - 4, padT + 14);
    canvas.setAttribute("aria-label", canvas.getAttribute("aria-label").split(":")[0] + ": now " + last);
  }

  // ---- controls ------------------------------------------------------------------
  async function control(what) {
    const id = selected;
    if (id === null) return;
    const path = "vms/" + encodeURIComponent(id);
    const buttons = ["btn-pause", "btn-resume", "btn-stop"].map($);
    buttons.forEach((b) => (b.disabled = true));
    try {
      if (what === "pause") await api("PATCH", path, { state: "Paused" });
      else if (what === "resume") await api("PATCH", path, { state: "Resumed" });
      else if (what === "stop") await api("POST", path + "/stop");
      clearError();
    } catch (e) {
      showError(what[0].toUpperCase() + what.slice(1) + " of VM " + id + " failed: " + e.message);
    }
    await poll();
  }

  function askStop() {
    if (selected === null) return;
    const dlg = $("confirm-stop");
    $("confirm-id").textContent = selected;
    dlg.returnValue = "";
    if (typeof dlg.showModal === "function") dlg.showModal();
    else if (window.confirm("Stop VM " + selected + "?")) control("stop");
  }

  function showError(msg) {
    $("error-text").textContent = msg;
    $("error").hidden = false;
  }
  function clearError() {
    $("error").hidden = true;
    $("error-text").textContent = "";
  }

  // ---- events: server-sent events read through fetch() ----------------------------
  let events = [];

  async function followEvents() {
    if (eventsAbort) eventsAbort.abort();
    const ctl = new AbortController();
    eventsAbort = ctl;
    const status = $("events-status");
    try {
      const res = await fetch("events", { headers: headers({ Accept: "text/event-stream" }), signal: ctl.signal, cache: "no-store" });
      if (res.status === 401) { status.textContent = "Token needed."; return; }
      if (!res.ok || !res.body) throw new Error(res.status + " " + res.statusText);
      status.textContent = "Following the event stream.";
      eventsBackoff = 1000;
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value.replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          onSseBlock(block);
        }
      }
      throw new Error("the stream ended");
    } catch (e) {
      if (ctl.signal.aborted) return;
      status.textContent = "Event stream lost (" + e.message + "); retrying\u2026";
      setTimeout(() => { if (eventsAbort === ctl) followEvents(); }, eventsBackoff);
      eventsBackoff = Math.min(eventsBackoff * 2, 15000);
    }
  }

  function onSseBlock(block) {
    let data = [], type = "message";
    for (const line of block.split("\n")) {
      if (line.startsWith(":")) continue; // comment / keep-alive
      const i = line.indexOf(":");
      const field = i < 0 ? line : line.slice(0, i);
      let value = i < 0 ? "" : line.slice(i + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") data.push(value);
      else if (field === "event") type = value;
    }
    if (data.length === 0) return;
    let ev;
    try { ev = JSON.parse(data.join("\n")); } catch (_) { ev = { output: data.join("\n"), rule: type }; }
    if (!ev || typeof ev !== "object") return;
    ev._type = type;
    events.unshift(ev);
    if (events.length > MAX_EVENTS) events.length = MAX_EVENTS;
    if (shows(ev)) $("events").prepend(eventItem(ev));
    trimList();
  }

  function eventVm(ev) {
    const f = ev.output_fields || {};
    return f["vm.id"] ?? f.vm_id ?? f.vm ?? ev.vm_id ?? null;
  }

  function shows(ev) {
    if (!$("events-selected-only").checked || selected === null) return true;
    const v = eventVm(ev);
    return v === null || String(v) === selected;
  }

  function eventItem(ev) {
    const li = document.createElement("li");
    const prio = String(ev.priority || "informational").toLowerCase();
    li.dataset.rule = ev.rule || "";
    const vm = eventVm(ev);
    if (vm !== null) li.dataset.vmId = String(vm);
    const t = document.createElement("time");
    const when = ev.time ? new Date(ev.time) : new Date();
    t.dateTime = isNaN(when) ? "" : when.toISOString();
    t.textContent = isNaN(when) ? String(ev.time) : when.toLocaleTimeString();
    const p = document.createElement("span");
    p.className = "prio prio-" + prio.replace(/[^a-z]/g, "");
    p.textContent = prio;
    const text = document.createElement("span");
    const rule = document.createElement("span");
    rule.className = "rule";
    rule.textContent = ev.rule || ev._type;
    text.appendChild(rule);
    text.appendChild(document.createTextNode(ev.output || ""));
    li.append(t, p, text);
    return li;
  }

  function trimList() {
    const list = $("events");
    while (list.children.length > MAX_EVENTS) list.lastChild.remove();
  }

  function renderEvents() {
    const list = $("events");
    list.replaceChildren(...events.filter(shows).map(eventItem));
  }

  // ---- token ---------------------------------------------------------------------
  function askToken(msg) {
    needLogin = true;
    clearTimeout(pollTimer);
    if (eventsAbort) eventsAbort.abort();
    $("app").hidden = true;
    $("login").hidden = false;
    if (msg) showError(msg);
    $("token").focus();
  }

  function start() {
    needLogin = false;
    $("login").hidden = true;
    $("app").hidden = false;
    $("forget-token").hidden = !token;
    poll();
    followEvents();
  }

  function init() {
    $("login-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      token = $("token").value.trim();
      $("token").value = "";
      sessionStorage.setItem(TOKEN_KEY, token);
      clearError();
      start();
    });
    $("forget-token").addEventListener("click", () => {
      token = "";
      sessionStorage.removeItem(TOKEN_KEY);
      location.reload();
    });
    $("error-dismiss").addEventListener("click", clearError);
    $("btn-pause").addEventListener("click", () => control("pause"));
    $("btn-resume").addEventListener("click", () => control("resume"));
    $("btn-stop").addEventListener("click", askStop);
    $("confirm-stop").addEventListener("close", () => {
      if ($("confirm-stop").returnValue === "stop") control("stop");
    });
    $("events-selected-only").addEventListener("change", renderEvents);
    window.addEventListener("resize", renderDetail);
    start();
  }

  // For tests and the curious: read-only views of what the page holds.
  window.vigilDashboard = {
    series: (id) => (vms.get(String(id)) || { series: [] }).series.map((p) => Object.assign({}, p)),
    state: (id) => { const e = vms.get(String(id)); return e ? stateOf(e.vm) : null; },
    vms: () => [...vms.keys()],
    selected: () => selected,
    select: (id) => select(String(id)),
    events: () => events.map((e) => Object.assign({}, e)),
  };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
