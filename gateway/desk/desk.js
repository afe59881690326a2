// The duty desk: log in, follow the site's state (server-sent events), act on alarms and incidents.
// Plain JavaScript, no library: the page must work with no internet.
"use strict";

const LEVELS = { 1: "一级", 2: "二级", 3: "三级" };
// The plans' deadlines from the raise: level 1 feedback in 5 min; level 2 (and 3) report in 10, decision in 30.
const DEADLINES = { 1: [["反馈", 300]], 2: [["报告", 600], ["决策", 1800]], 3: [["报告", 600], ["决策", 1800]] };
const NOTE_KINDS = { measure: "措施", result: "结果", cause: "原因", spare: "备件", summary: "总结", ack: "确认", close: "关闭" };
const FORMS = { l1: "一级响应处置记录表", first: "首报", followup: "续报", final: "终报" };
const DAY_FORMS = { county: "县级应急事件报告表", school: "校级应急事件报告表", day: "当日告警日志" };
const STATUS = { online: "在线", offline: "离线", silent: "离线", unknown: "未连接" };

let me = null; // {user, role, csrf}
let state = null; // the last state the server sent
let skew = 0; // server clock minus ours, seconds
let source = null;
let shown = null; // the panel's subject: () => redraw it

const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const now = () => Date.now() / 1000 + skew;
const clock = (t) => (t ? new Date(t * 1000).toLocaleString("zh-CN", { hour12: false }) : "");
const may = (action) => me && (me.role === "admin" || (me.role === "duty" && action !== "admin"));

function mmss(s) {
  s = Math.max(0, Math.floor(s));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

async function call(method, path, body) {
  const opts = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  if (method !== "GET" && me) opts.headers["X-CSRF-Token"] = me.csrf;
  const r = await fetch(path, opts);
  const data = r.headers.get("Content-Type")?.includes("json") ? await r.json() : {};
  if (!r.ok) throw Object.assign(new Error(data.error || `HTTP ${r.status}`), { status: r.status });
  return data;
}

// --- log-in ---------------------------------------------------------------------------------------

function showLogin() {
  me = null;
  if (source) source.close();
  $("#desk").hidden = true;
  $("#logout").hidden = true;
  $("#me").textContent = "";
  $("#login").hidden = false;
}

function showDesk() {
  $("#login").hidden = true;
  $("#desk").hidden = false;
  $("#logout").hidden = false;
  $("#me").textContent = `${me.user}（${{ viewer: "查看", duty: "值班", admin: "管理" }[me.role] || me.role}）`;
  document.body.dataset.role = me.role;
  connect();
}

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = ev.target;
  $("#login-error").textContent = "";
  try {
    me = await call("POST", "/desk/login", { name: f.name.value, password: f.password.value });
    f.password.value = "";
    showDesk();
  } catch (err) {
    $("#login-error").textContent = err.message;
  }
});

$("#logout").addEventListener("click", async () => {
  try { await call("POST", "/desk/logout"); } finally { showLogin(); }
});

// --- the live state -----------------------------------------------------------------------------------

function connect() {
  if (source) source.close();
  source = new EventSource("/desk/events");
  source.addEventListener("state", (ev) => {
    state = JSON.parse(ev.data);
    skew = state.now - Date.now() / 1000;
    $("#conn").textContent = "实时";
    $("#conn").classList.add("up");
    render();
  });
  source.onerror = async () => {
    $("#conn").textContent = "重连中";
    $("#conn").classList.remove("up");
    try { await call("GET", "/desk/session"); } catch (err) { if (err.status === 401) showLogin(); }
  };
}

function tile(room, active) {
  const mine = active.filter((a) => a.site === room.site && a.room === room.room);
  const taken = mine.length > 0 && mine.every((a) => a.acked_by);
  // an alarm's colour first (an offline room has the gateway's own alarm once its heartbeats stop), else grey
  const off = room.offline || room.status === "unknown";
  const cls = room.level ? `tile tile-l${room.level}${taken ? " taken" : ""}` : off ? "tile offline" : "tile tile-ok";
  const label = [room.level ? `${LEVELS[room.level]}${taken ? " 处理中" : ""}` : "", off ? STATUS[room.status] : "", room.level || off ? "" : "正常"]
    .filter(Boolean).join(" ");
  return `<button type="button" class="${cls}" data-agent="${esc(room.agent)}" data-level="${room.level}"`
    + ` data-taken="${taken}">${esc(room.room)}<small>${esc(room.site)} · ${label}</small></button>`;
}

function dues(level, since, acked) {
  if (acked) return `<span class="due done">已确认（${esc(acked.by)} ${clock(acked.at)}）</span>`;
  return (DEADLINES[level] || []).map(([label, secs]) =>
    `<span class="due" data-due="${since + secs}" data-label="${label}"></span>`).join("");
}

function render() {
  if (!state) return;
  const active = state.alarms.filter((a) => a.state !== "cleared");
  $("#rooms").innerHTML = state.rooms.filter((r) => !r.secrecy).map((r) => tile(r, active)).join("") || '<p class="empty">没有考场</p>';
  $("#secrecy").innerHTML = state.rooms.filter((r) => r.secrecy).map((r) => tile(r, active)).join("") || '<p class="empty">未配置保密室</p>';
  $("#alarms").innerHTML = state.alarms.map((a) => `
    <li class="alarm l${a.level}${a.state === "cleared" ? " cleared" : ""}" data-id="${esc(a.id)}">
      <div class="what">${LEVELS[a.level]} · ${esc(a.site)}/${esc(a.room)} · ${esc(a.message)}</div>
      <div class="meta">${esc(a.device)} · ${esc(a.rule)} · 发生 ${clock(a.raised_at)}${a.cleared_at ? ` · 已恢复 ${clock(a.cleared_at)}` : ""}</div>
      <div>${a.state === "cleared" ? "" : dues(a.level, a.raised_at, a.acked_by && { by: a.acked_by, at: a.acked_at })}</div>
      <div class="actions"><button type="button" class="light" data-open-alarm="${esc(a.id)}">详情与处理</button></div>
    </li>`).join("") || '<li class="empty">没有告警</li>';
  $("#incidents").innerHTML = state.incidents.map((i) => `
    <li class="incident l${i.level}${i.state === "closed" ? " cleared" : ""}" data-id="${esc(i.id)}">
      <div class="what">${LEVELS[i.level]} · ${esc(i.title)}</div>
      <div class="meta">${esc(i.site)} · 考场 ${i.active.map(esc).join("、") || "—"} · 开始 ${clock(i.opened_at)}${i.closed_at ? ` · 已关闭 ${clock(i.closed_at)}` : ""}</div>
      <div>${i.state === "closed" ? "" : dues(i.level, i.opened_at, i.acked_by && { by: i.acked_by, at: i.acked_at })}</div>
      <div class="actions"><button type="button" class="light" data-open-incident="${esc(i.id)}">详情与处理</button></div>
    </li>`).join("") || '<li class="empty">没有事件</li>';
  $("#day-reports").innerHTML = dayReports(new Date(now() * 1000));
  tick();
  if (shown) shown();
}

function tick() {
  const t = now();
  for (const el of document.querySelectorAll(".due[data-due]")) {
    const left = Number(el.dataset.due) - t;
    el.classList.toggle("overdue", left < 0);
    el.textContent = left >= 0 ? `${el.dataset.label} 剩余 ${mmss(left)}` : `${el.dataset.label} 超时 ${mmss(-left)}`;
  }
}
setInterval(tick, 1000);

// --- the panel: a room, an alarm, an incident ---------------------------------------------------------

function openPanel(draw) {
  shown = null;
  $("#panel").hidden = false;
  draw().catch((err) => { $("#panel-body").innerHTML = `<p class="error">${esc(err.message)}</p>`; });
}
$("#panel-close").addEventListener("click", () => { $("#panel").hidden = true; shown = null; });

document.addEventListener("click", (ev) => {
  const el = ev.target.closest("[data-agent],[data-open-alarm],[data-open-incident]");
  if (!el) return;
  if (el.dataset.agent) openPanel(() => showRoom(el.dataset.agent));
  else if (el.dataset.openAlarm) openPanel(() => showAlarm(el.dataset.openAlarm));
  else openPanel(() => showIncident(el.dataset.openIncident));
});

async function showRoom(agent) {
  const r = await call("GET", `/desk/api/room?agent=${encodeURIComponent(agent)}`);
  const devices = r.devices.map((d) => d.readings.map((m, n) => `<tr>${n ? "<td></td><td></td>" : `<td>${esc(d.device)}</td><td>${esc(d.kind)}</td>`}`
    + `<td>${esc(m.metric)}</td><td>${esc(m.value)}</td><td>${clock(m.ts)}</td></tr>`).join("")
    || `<tr><td>${esc(d.device)}</td><td>${esc(d.kind)}</td><td colspan="3">无读数</td></tr>`).join("");
  const alarms = r.alarms.map((a) => `<tr><td>${LEVELS[a.level]}</td><td>${esc(a.message)}</td><td>${clock(a.raised_at)}</td>`
    + `<td>${a.cleared_at ? clock(a.cleared_at) : "未恢复"}</td><td>${esc(a.acked_by || "")}</td></tr>`).join("");
  $("#panel-body").innerHTML = `<h2>考场 ${esc(agent)}</h2>
    <h3>设备与最新读数</h3><table><tr><th>设备</th><th>类型</th><th>指标</th><th>值</th><th>时间</th></tr>${devices || '<tr><td colspan="5">尚无设备信息</td></tr>'}</table>
    <h3>告警记录</h3><table><tr><th>级别</th><th>内容</th><th>发生</th><th>恢复</th><th>确认人</th></tr>${alarms || '<tr><td colspan="5">无</td></tr>'}</table>`;
}

function notesHtml(notes) {
  return notes.map((n) => `<tr><td>${clock(n.at)}</td><td>${esc(n.who)}</td><td>${NOTE_KINDS[n.category] || esc(n.category)}</td><td>${esc(n.text)}</td></tr>`).join("")
    || '<tr><td colspan="4">无</td></tr>';
}

function actionForms(kind, id, acked, closable) {
  if (!may("ack")) return '<p class="empty">只读账号：不能确认或记录。</p>';
  const options = ["measure", "result", "cause", "spare", "summary"].map((c) => `<option value="${c}">${NOTE_KINDS[c]}</option>`).join("");
  return `${acked ? "" : `<form data-act="ack" data-kind="${kind}" data-id="${esc(id)}"><b>确认</b>
      <label>确认人<input name="who" maxlength="64" value="${esc(me.user)}"></label>
      <label>处理情况<textarea name="note" rows="2" maxlength="1000"></textarea></label><button type="submit">确认</button></form>`}
    <form data-act="note" data-kind="${kind}" data-id="${esc(id)}"><b>续报记录</b>
      <label>类别<select name="category">${options}</select></label>
      <label>内容<textarea name="text" rows="2" maxlength="1000" required></textarea></label><button type="submit">添加记录</button></form>
    ${closable ? `<form data-act="close" data-id="${esc(id)}"><b>关闭事件</b>
      <label>说明<textarea name="note" rows="2" maxlength="1000"></textarea></label><button type="submit">关闭事件</button></form>` : ""}
    <p id="act-error" class="error" role="alert"></p>`;
}

async function showAlarm(id) {
  const r = await call("GET", `/desk/api/alarm?id=${encodeURIComponent(id)}`);
  const a = r.alarm;
  const steps = r.timeline.map((t) => `<tr><td>${clock(t.at)}</td><td>${esc(t.state)}</td><td>${LEVELS[t.level]}</td><td>${clock(t.received)}</td></tr>`).join("");
  $("#panel-body").innerHTML = `<h2>${LEVELS[a.level]}告警 · ${esc(a.site)}/${esc(a.room)}</h2>
    <p>${esc(a.message)}</p><p class="meta">${esc(a.device)} · ${esc(a.rule)} · 发生 ${clock(a.raised_at)}
    ${a.cleared_at ? ` · 已恢复 ${clock(a.cleared_at)}` : ""}</p>
    <div>${a.state === "cleared" ? "" : dues(a.level, a.raised_at, a.acked_by && { by: a.acked_by, at: a.acked_at })}</div>
    <h3>经过</h3><table><tr><th>考场时间</th><th>状态</th><th>级别</th><th>网关收到</th></tr>${steps}</table>
    <h3>记录</h3><table><tr><th>时间</th><th>人</th><th>类别</th><th>内容</th></tr>${notesHtml(r.notes)}</table>
    ${actionForms("alarm", a.id, !!a.acked_by, false)}
    <h3>报告</h3><p class="reports">${reportLinks(`incident=${encodeURIComponent(a.id)}`, { l1: FORMS.l1 })}</p>`;
  tick();
}

async function showIncident(id) {
  const r = await call("GET", `/desk/api/incident?id=${encodeURIComponent(id)}`);
  const i = r.incident;
  $("#panel-body").innerHTML = `<h2>${LEVELS[i.level]}事件 · ${esc(i.title)}</h2>
    <p class="meta">${esc(i.site)} · 涉及考场 ${i.members.map(esc).join("、")} · 开始 ${clock(i.opened_at)}
    ${i.closed_at ? ` · 已关闭 ${clock(i.closed_at)}` : ""}</p>
    <div>${i.state === "closed" ? "" : dues(i.level, i.opened_at, i.acked_by && { by: i.acked_by, at: i.acked_at })}</div>
    <h3>时间线</h3><div class="svg">${r.svg}</div>
    <h3>记录</h3><table><tr><th>时间</th><th>人</th><th>类别</th><th>内容</th></tr>${notesHtml(r.notes)}</table>
    ${actionForms("incident", i.id, !!i.acked_by, i.state === "open")}
    <h3>报告</h3><p class="reports">${reportLinks(`incident=${encodeURIComponent(i.id)}`, FORMS)}</p>
    <p class="reports">${dayReports(new Date(i.opened_at * 1000))}</p>`;
  for (const mark of document.querySelectorAll("#panel svg text[data-ts]")) {
    mark.textContent = new Date(mark.dataset.ts * 1000).toLocaleTimeString("zh-CN", { hour12: false });
  }
  tick();
}

function reportLinks(scope, forms) {
  return Object.entries(forms).map(([form, name]) =>
    ["pdf", "docx"].map((fmt) => `<a href="/desk/reports?${scope}&form=${form}&format=${fmt}">${name}（${fmt.toUpperCase()}）</a>`).join("")).join("");
}

function dayReports(date) {
  const day = `${date.getFullYear()}-${String(date.getMonth() + 1).padStart(2, "0")}-${String(date.getDate()).padStart(2, "0")}`;
  return `${day}：${reportLinks(`day=${day}`, DAY_FORMS)}`;
}

document.addEventListener("submit", async (ev) => {
  const f = ev.target.closest("form[data-act]");
  if (!f) return;
  ev.preventDefault();
  const data = Object.fromEntries(new FormData(f).entries());
  try {
    await call("POST", `/desk/api/${f.dataset.act}`, { ...(f.dataset.kind ? { kind: f.dataset.kind } : {}), id: f.dataset.id, ...data });
    const kind = f.dataset.kind || "incident";
    openPanel(() => (kind === "alarm" ? showAlarm(f.dataset.id) : showIncident(f.dataset.id)));
  } catch (err) {
    $("#act-error").textContent = err.message;
  }
});

call("GET", "/desk/session").then((s) => { me = s; showDesk(); }, showLogin);
