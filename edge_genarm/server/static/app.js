// The chat page: streams /v1/chat/completions with this message's weights in `genarm`.
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];  // {role, content} of the conversation so far
let arms = {};       // name -> default weight (from /v1/models)
let presets = {};    // model id -> its weights
let controller = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem("genarm-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, opts = {}) {
  const r = await fetch(path, { ...opts, headers: headers() });
  if (r.status === 401) {
    $("keybox").hidden = false;
    throw new Error("this server needs an API key: type it at the top, then retry");
  }
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { const e = await r.json(); msg = (e.error && (e.error.message || e.error)) || msg; } catch (_) {}
    throw new Error(msg);
  }
  return r;
}

async function init() {
  try {
    const data = (await (await api("/v1/models")).json()).data;
    $("model").innerHTML = "";
    for (const m of data) { $("model").add(new Option(m.id, m.id)); presets[m.id] = m.genarm.weights; }
    arms = data[0].genarm.weights;
    buildSliders();
    $("status").textContent = "ready: " + data[0].id;
  } catch (e) {
    $("status").textContent = e.message;
  }
}

function buildSliders() {
  const box = $("sliders");
  box.innerHTML = "";
  if (!Object.keys(arms).length) box.textContent = "This bundle has no ARMs: the base model alone.";
  for (const [name, w] of Object.entries(arms)) {
    const div = document.createElement("div");
    div.className = "slider";
    div.innerHTML = `<label for="w-${name}"><span>${name}</span><output id="v-${name}">${Number(w).toFixed(2)}</output></label>
      <input type="range" id="w-${name}" class="weight" data-arm="${name}" min="-1" max="3" step="0.05" value="${w}">`;
    box.appendChild(div);
    const input = div.querySelector("input");
    input.addEventListener("input", () => { $("v-" + name).textContent = Number(input.value).toFixed(2); });
  }
}

function weights() {
  const w = {};
  for (const s of document.querySelectorAll("input.weight")) w[s.dataset.arm] = Number(s.value);
  return w;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.innerHTML = `<div class="who">${role}</div><div class="body"></div><div class="meta"></div>`;
  div.querySelector(".body").textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function tokenSpan(text, ex) {
  const span = document.createElement("span");
  span.textContent = text;
  if (!ex) return span;
  span.className = "tok" + (ex.changed === "guidance" ? " g" : ex.changed === "nudge" ? " n" : "");
  const terms = Object.entries(ex.arm_terms).map(([k, v]) => `${k}: ${v === null ? "-inf" : v.toFixed(3)}`);
  let tip = terms.length ? "ARM terms (w·log p): " + terms.join(", ") : "no ARM ran";
  if (ex.base_pick && ex.base_pick.id !== ex.id) tip += `\nthe base would have picked ${JSON.stringify(ex.base_pick.token)}`;
  if (ex.nudged_from) tip += `\nnudged from ${JSON.stringify(ex.nudged_from.token)}`;
  span.title = tip;
  return span;
}

async function send(message) {
  history.push({ role: "user", content: message });
  addMessage("user", message);
  const reply = addMessage("assistant", "");
  reply.classList.add("reply");
  const body = reply.querySelector(".body");
  const w = weights();
  const req = {
    model: $("model").value, messages: history, stream: true, stream_options: { include_usage: true },
    max_tokens: Number($("max").value) || 512,
    genarm: { weights: w, nudge: $("nudge").checked, explain: $("explain").checked },
  };
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  $("status").textContent = "waiting for the model…";
  let text = "", used = null, timings = null;
  try {
    const r = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(req), signal: controller.signal });
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.genarm && chunk.genarm.weights) used = chunk.genarm.weights;
        if (chunk.genarm && chunk.genarm.timings) timings = chunk.genarm.timings;
        const c = chunk.choices && chunk.choices[0];
        if (!c || !c.delta || !c.delta.content && !(chunk.genarm && chunk.genarm.explain)) continue;
        const ex = chunk.genarm && chunk.genarm.explain ? chunk.genarm.explain[0] : null;
        text += c.delta.content || "";
        body.appendChild(tokenSpan(c.delta.content || "", ex));
        $("status").textContent = "generating…";
        $("log").scrollTop = $("log").scrollHeight;
      }
    }
    history.push({ role: "assistant", content: text });
    const ws = used ? Object.entries(used).map(([k, v]) => `${k}=${v}`).join(" ") : "";
    reply.querySelector(".meta").textContent =
      (timings ? `${timings.tokens} tokens, ${timings.tok_per_s} tok/s` : "") + (ws ? ` · weights ${ws}` : "");
    $("status").textContent = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      history.push({ role: "assistant", content: text });
      $("status").textContent = "stopped";
    } else {
      history.pop();
      reply.classList.add("error");
      body.textContent = e.message;
      $("status").textContent = "error";
    }
  } finally {
    controller = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("msg").value.trim();
  if (!text || controller) return;
  $("msg").value = "";
  send(text);
});
$("msg").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
});
$("model").addEventListener("change", () => {  // a preset sets the sliders to its weights
  for (const [name, w] of Object.entries(presets[$("model").value] || {})) {
    const s = $("w-" + name);
    if (s) { s.value = w; $("v-" + name).textContent = Number(w).toFixed(2); }
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("key").addEventListener("change", () => { localStorage.setItem("genarm-key", $("key").value); init(); });
init();
