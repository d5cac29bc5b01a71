// The elborl dashboard: polls the status API and draws the state, curves, samples and workers.
// No build step and no dependencies. The token travels only in the Authorization header; it is
// read from the URL fragment (#token=..., never sent to the server) or typed in, and kept in
// this tab's sessionStorage.
"use strict";

const API = "/api/v1";
const params = new URLSearchParams(location.search);
const REFRESH_S = Math.max(1, Number(params.get("refresh")) || 3);
const SVG_NS = "http://www.w3.org/2000/svg";
const CURVE_KEYS = ["reward/mean", "reward/std", "reward/accuracy", "eval/accuracy"];
// Keys under reward/ that are not one reward's own mean, and eval/reward_* that are not a
// watched reward's.
const NOT_A_REWARD = new Set(["mean", "std", "accuracy", "diversity", "valid_fraction"]);

const view = {
  run: params.get("run"), history: [], lastRound: 0, gridUrl: null, timer: null,
  keys: [...CURVE_KEYS],
};
const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ token
function takeToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("elborl-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("elborl-token");
}

class AuthError extends Error {}

async function api(path, options = {}) {
  const token = sessionStorage.getItem("elborl-token");
  const resp = await fetch(path, {
    ...options,
    headers: { Authorization: `Bearer ${token}`, ...(options.headers || {}) },
    cache: "no-store",
  });
  if (resp.status === 401 || resp.status === 403) {
    throw new AuthError(resp.status === 401 ? "a token is needed" : "that token was rejected");
  }
  return resp;
}

async function apiJson(path, options) {
  const resp = await api(path, options);
  if (!resp.ok) {
    const body = await resp.json().catch(() => ({}));
    const err = new Error(body.detail || `${resp.status} ${resp.statusText}`);
    err.status = resp.status;
    throw err;
  }
  return resp.json();
}

function showLogin(message) {
  $("main").hidden = true;
  $("login").hidden = false;
  $("login-msg").textContent = message || "";
  $("token-input").focus();
}

// ------------------------------------------------------------------ formatting
const fmt = (v, digits = 3) => (v === null || v === undefined ? "-" : Number(v).toFixed(digits));

function duration(s) {
  if (s === null || s === undefined) return "-";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  if (h > 0) return `${h} h ${String(m).padStart(2, "0")} min`;
  return m >= 10 ? `${m} min` : m > 0 ? `${m} min ${sec} s` : `${sec} s`;
}

function setText(id, text) {
  $(id).textContent = text;
}

// ------------------------------------------------------------------ status
function renderStatus(d) {
  const state = $("state");
  state.textContent = d.state;
  state.dataset.state = d.state;
  state.className = `state state-${d.state}`;
  state.title = d.error || "";
  const age = d.updated ? Date.now() / 1000 - d.updated : null;
  setText("updated", age === null ? "" : `updated ${duration(age)} ago`);
  const err = $("error");
  err.hidden = !d.error;
  err.textContent = d.error ? `Error: ${d.error}` : "";
  const warn = $("warnings");
  const warnings = d.warnings || [];
  warn.hidden = warnings.length === 0;
  warn.textContent = warnings.map((w) => `Warning: ${w}`).join("\n");

  setText("round", d.round);
  setText("total", d.total_rounds ?? "?");
  $("progress-bar").style.width = d.total_rounds ? `${(100 * d.round) / d.total_rounds}%` : "0";
  setText("reward", fmt(d.reward_mean));
  setText("reward-std", d.reward_std === null ? "" : `± ${fmt(d.reward_std)}`);
  setText("accuracy", fmt(d.accuracy));
  setText("accuracy-round", d.accuracy_round ? `at round ${d.accuracy_round}` : "");
  setText("ips", fmt(d.images_per_s ?? d.rollout_images_per_s, 1));
  setText("spr", d.seconds_per_round ? `${fmt(d.seconds_per_round, 1)} s per round` : "");
  setText("eta", d.state === "finished" ? "done" : duration(d.eta_s));
  setText("eta-at", d.eta_s ? new Date(Date.now() + d.eta_s * 1000).toLocaleTimeString() : "");
  setText("version", d.policy_version ?? "-");
  setText("checkpoint", d.last_checkpoint ? `checkpoint at round ${d.last_checkpoint_round}` : "no checkpoint yet");
  $("checkpoint").title = d.last_checkpoint || "";

  const live = ["starting", "running"].includes(d.state) && !d.stop_requested;
  $("stop-btn").hidden = !live;

  const tbody = $("workers").querySelector("tbody");
  tbody.replaceChildren(
    ...d.workers.map((w) => {
      const ok = w.alive === w.num_workers;
      return row([
        w.role,
        w.num_workers,
        { text: w.alive ?? "?", cls: ok ? "ok" : "bad" },
        w.restarts,
        w.nodes.map((n) => n.slice(0, 8)).join(", "),
      ]);
    }),
  );
  if (!d.workers.length) tbody.replaceChildren(row([{ text: "no worker report yet", cls: "muted" }]));
  $("config").replaceChildren(
    ...Object.entries(d.config).flatMap(([k, v]) => {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = k;
      dd.textContent = String(v);
      return [dt, dd];
    }),
  );
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    td.textContent = typeof c === "object" && c !== null ? c.text : c;
    if (typeof c === "object" && c !== null && c.cls) td.className = c.cls;
    tr.append(td);
  }
  return tr;
}

// ------------------------------------------------------------------ charts
function el(name, attrs, parent) {
  const e = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.append(e);
  return e;
}

function niceTicks(lo, hi, count = 5) {
  const span = hi - lo || 1;
  const step0 = span / count;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => s >= step0);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9; t += step) ticks.push(+t.toFixed(10));
  return ticks;
}

// series: [{name, cls, points: [[round, y]], band: [[round, lo, hi]] (optional), dots: bool}]
function lineChart(svg, series, yRange) {
  svg.replaceChildren();
  const W = 640, H = 260, L = 48, R = 14, T = 12, B = 30;
  const all = series.flatMap((s) => s.points);
  if (!all.length) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, svg).textContent =
      "no data yet";
    return;
  }
  const xs = all.map((p) => p[0]);
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  let [y0, y1] = yRange || [
    Math.min(...series.flatMap((s) => (s.band || s.points).map((p) => p[1]))),
    Math.max(...series.flatMap((s) => (s.band || s.points).map((p) => p[p.length - 1]))),
  ];
  if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);

  const grid = el("g", { class: "grid" }, svg);
  for (const t of niceTicks(y0, y1)) {
    el("line", { x1: L, x2: W - R, y1: sy(t), y2: sy(t) }, grid);
    el("text", { x: L - 6, y: sy(t) + 4, "text-anchor": "end" }, grid).textContent = t;
  }
  for (const t of niceTicks(x0, x1, 8).filter(Number.isInteger)) {
    el("text", { x: sx(t), y: H - B + 16, "text-anchor": "middle" }, grid).textContent = t;
  }
  el("text", { x: W - R, y: H - 2, "text-anchor": "end", class: "axis-label" }, grid).textContent =
    "round";

  for (const s of series) {
    const g = el("g", { class: `series ${s.cls}` }, svg);
    if (s.band && s.band.length > 1) {
      const upper = s.band.map(([x, , hi]) => `${sx(x)},${sy(hi)}`);
      const lower = s.band.map(([x, lo]) => `${sx(x)},${sy(lo)}`).reverse();
      el("polygon", { points: [...upper, ...lower].join(" "), class: "band" }, g);
    }
    el("polyline", { points: s.points.map(([x, y]) => `${sx(x)},${sy(y)}`).join(" ") }, g);
    if (s.dots) {
      for (const [x, y] of s.points) {
        const c = el("circle", { cx: sx(x), cy: sy(y), r: 3, class: "pt", "data-round": x }, g);
        el("title", {}, c).textContent = `round ${x}: ${fmt(y)}`;
      }
    }
  }
}

function drawCharts() {
  const pts = (key) =>
    view.history.filter((r) => r.values[key] != null).map((r) => [r.round, r.values[key]]);
  const reward = pts("reward/mean");
  const band = view.history
    .filter((r) => r.values["reward/mean"] != null && r.values["reward/std"] != null)
    .map((r) => [r.round, r.values["reward/mean"] - r.values["reward/std"],
      r.values["reward/mean"] + r.values["reward/std"]]);
  lineChart($("reward-chart"), [{ name: "reward", cls: "reward", points: reward, band, dots: true }]);
  lineChart(
    $("accuracy-chart"),
    [
      { name: "rollouts", cls: "train", points: pts("reward/accuracy"), dots: false },
      { name: "held-out", cls: "eval", points: pts("eval/accuracy"), dots: true },
    ],
    [0, 1],
  );
}

// Each reward's own curves: the training rewards' (reward/<name>) from the rollouts, the
// watched ones' (eval/reward_<name>) on held-out prompts, and the diversity of each prompt's
// images; a chart per name, each on its own scale (rewards differ by orders of magnitude).
function rewardNames(keys) {
  const names = new Set();
  for (const k of keys) {
    const m = k.match(/^reward\/(.+)$/) || k.match(/^eval\/reward_(.+)$/);
    if (m && !NOT_A_REWARD.has(m[1])) names.add(m[1]);
  }
  return [...names].sort();
}

function rewardKeys(keys) {
  const names = rewardNames(keys);
  const out = names.flatMap((n) => [`reward/${n}`, `eval/reward_${n}`]);
  return [...out, "reward/diversity", "eval/diversity"].filter((k) => keys.includes(k));
}

function drawRewardCharts() {
  const pts = (key) =>
    view.history.filter((r) => r.values[key] != null).map((r) => [r.round, r.values[key]]);
  const names = rewardNames(view.keys);
  const panels = names.map((n) => [n, `reward/${n}`, `eval/reward_${n}`]);
  if (view.keys.some((k) => k.endsWith("/diversity"))) {
    panels.push(["diversity", "reward/diversity", "eval/diversity"]);
  }
  // One reward alone is the reward chart already; the panel is for several, or watched ones.
  const show = names.length > 1 || view.keys.some((k) => k.startsWith("eval/reward_"));
  $("rewards-section").hidden = !show;
  if (!show) return;
  const box = $("reward-charts");
  box.replaceChildren(
    ...panels.map(([name, train, held]) => {
      const fig = document.createElement("figure");
      fig.dataset.reward = name;
      const cap = document.createElement("figcaption");
      cap.textContent = name;
      const svg = document.createElementNS(SVG_NS, "svg");
      svg.setAttribute("viewBox", "0 0 640 260");
      svg.setAttribute("role", "img");
      svg.setAttribute("aria-label", `${name} per round`);
      fig.append(cap, svg);
      lineChart(svg, [
        { name: "rollouts", cls: "train", points: pts(train), dots: false },
        { name: "held-out", cls: "eval", points: pts(held), dots: true },
      ]);
      return fig;
    }),
  );
}

async function refreshHistory(run, round) {
  if (round < view.lastRound) { view.history = []; view.lastRound = 0; } // resumed: rewritten
  const keys = view.keys.map(encodeURIComponent).join(",");
  const m = await apiJson(`${API}/runs/${encodeURIComponent(run)}/metrics?since=${view.lastRound}&keys=${keys}`);
  const wanted = [...CURVE_KEYS, ...rewardKeys(m.keys)];
  if (wanted.some((k) => !view.keys.includes(k))) {
    // Per-reward metrics seen for the first time: fetch the whole history with them.
    view.keys = wanted;
    view.history = [];
    view.lastRound = 0;
    return refreshHistory(run, round);
  }
  if (m.records.length) {
    view.history.push(...m.records);
    view.lastRound = m.records[m.records.length - 1].round;
  }
  drawCharts();
  drawRewardCharts();
}

// ------------------------------------------------------------------ samples
async function refreshSamples(run) {
  let grid;
  try {
    grid = await apiJson(`${API}/runs/${encodeURIComponent(run)}/samples/latest?kind=train`);
  } catch (e) {
    if (e.status !== 404) throw e;
    try {
      grid = await apiJson(`${API}/runs/${encodeURIComponent(run)}/samples/latest?kind=eval`);
    } catch (e2) {
      if (e2.status !== 404) throw e2;
      $("samples-empty").hidden = false;
      return;
    }
  }
  $("samples-empty").hidden = true;
  const what = grid.kind === "eval" ? "held-out prompts, trained weights" : "training rollouts";
  setText("samples-caption", `round ${grid.round}, ${what}`);
  if (grid.image_url !== view.gridUrl) {
    // <img src> cannot send the header: fetch the PNG and show it from a blob URL.
    const blob = await (await api(grid.image_url)).blob();
    const img = $("samples-img");
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(blob);
    view.gridUrl = grid.image_url;
    $("samples-list").replaceChildren(
      ...grid.prompts.map((p, i) => {
        const li = document.createElement("li");
        const r = grid.rewards[i];
        const score = document.createElement("span");
        score.className = `score ${r === 1 ? "ok" : r > 0 ? "part" : "bad"}`;
        score.textContent = fmt(r, 2);
        li.append(score, ` ${p}`);
        return li;
      }),
    );
  }
}

// ------------------------------------------------------------------ loop
async function refresh() {
  try {
    const { runs } = await apiJson(`${API}/runs`);
    const select = $("run-select");
    const names = runs.map((r) => r.run_id);
    if (select.options.length !== names.length || [...select.options].some((o, i) => o.value !== names[i])) {
      select.replaceChildren(...names.map((n) => new Option(n, n)));
    }
    if (!view.run || !names.includes(view.run)) view.run = names[0] || null;
    $("login").hidden = true;
    $("main").hidden = false;
    if (!view.run) {
      $("error").hidden = false;
      setText("error", "No runs in the served directory yet.");
      return;
    }
    select.value = view.run;
    const d = await apiJson(`${API}/runs/${encodeURIComponent(view.run)}`);
    renderStatus(d);
    await refreshHistory(view.run, d.round);
    await refreshSamples(view.run);
    document.title = `elborl: ${view.run} ${d.state} ${d.round}/${d.total_rounds ?? "?"}`;
  } catch (e) {
    if (e instanceof AuthError) {
      showLogin(e.message);
      return; // no polling until a token is entered
    }
    $("error").hidden = false;
    setText("error", `Cannot refresh: ${e.message}`);
  }
  view.timer = setTimeout(refresh, REFRESH_S * 1000);
}

function restart() {
  clearTimeout(view.timer);
  view.history = [];
  view.lastRound = 0;
  view.keys = [...CURVE_KEYS];
  view.gridUrl = null;
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  setText("refresh-s", REFRESH_S);
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("elborl-token", $("token-input").value.trim());
    $("token-input").value = "";
    restart();
  });
  $("run-select").addEventListener("change", (ev) => {
    view.run = ev.target.value;
    const url = new URL(location.href);
    url.searchParams.set("run", view.run);
    history.replaceState(null, "", url);
    restart();
  });
  $("stop-btn").addEventListener("click", async () => {
    if (!confirm(`Stop run ${view.run} after the round in flight (with a checkpoint)?`)) return;
    try {
      const r = await apiJson(`${API}/runs/${encodeURIComponent(view.run)}/stop`, { method: "POST" });
      setText("updated", r.message);
    } catch (e) {
      setText("updated", `stop failed: ${e.message}`);
    }
  });
  if (takeToken()) refresh();
  else showLogin();
});
