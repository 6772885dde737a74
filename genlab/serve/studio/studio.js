// genlab studio: plain JavaScript over the server's API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], job: null, lastSeed: null, page: 0, pageSize: 12, textAbort: null, chat: [] };

// -- the API: the key, errors said plainly --------------------------------------------------------------
$("api-key").value = localStorage.getItem("genlab-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("genlab-key", $("api-key").value.trim());
  init();
});

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

function explain(status, message) {
  if (status === 401) return "The server needs an API key: " + message + " (enter it at the top right).";
  if (status === 429) return "The server is busy — " + message;
  if (status === 413) return "Too large — " + message;
  if (status === 400 && message.includes("prompt filter")) return "Refused by the prompt filter: " + message;
  if (status === 400) return "Refused: " + message;
  if (status === 504) return "Timed out: " + message;
  return "Error " + status + ": " + message;
}

class ApiError extends Error {
  constructor(status, message) { super(explain(status, message)); this.status = status; }
}

async function api(path, options = {}) {
  const headers = { ...authHeaders(), ...(options.headers || {}) };
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(options.json);
  }
  const res = await fetch(path, { ...options, headers });
  if (!res.ok) throw new ApiError(res.status, await errorMessage(res));
  return res;
}

async function errorMessage(res) {
  try { return (await res.json()).error.message; } catch (e) { return res.statusText; }
}

function showError(e) {
  const box = $("error");
  if (!e) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = e.message || String(e);
  box.hidden = false;
}

// Server-sent events over fetch (EventSource cannot send the API key): calls onEvent(name, data).
async function readEvents(res, onEvent) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(name, data.join("\n"));
    }
  }
}

// Images behind the key: fetched, shown through an object URL.
async function loadImage(img, url) {
  const res = await api(url);
  img.src = URL.createObjectURL(await res.blob());
  return img;
}

// -- models and pickers ---------------------------------------------------------------------------------
async function init() {
  showError(null);
  try {
    const models = (await (await api("/v1/models")).json()).data;
    state.models = models;
    fill($("model"), models.filter((m) => m.capabilities.output === "image"));
    fill($("text-model"), models.filter((m) => m.capabilities.output === "text"));
    const opts = await (await api("/v1/studio/options")).json();
    fillNames($("sampler"), opts.samplers);
    fillNames($("schedule"), opts.schedules);
    modelChanged();
    refreshGallery();
    refreshQueue();
  } catch (e) { showError(e); }
}

function fill(select, models) {
  const keep = select.value;
  select.innerHTML = "";
  for (const m of models) select.add(new Option(`${m.id} (${m.family})`, m.id));
  if (models.some((m) => m.id === keep)) select.value = keep;
}

function fillNames(select, names) {
  select.length = 1;
  for (const n of names) select.add(new Option(n, n));
}

function currentModel() { return state.models.find((m) => m.id === $("model").value); }

function modelChanged() {
  const m = currentModel();
  if (!m) { $("model-info").textContent = "no image model served"; return; }
  const c = m.capabilities;
  $("prompt-row").hidden = !c.text_prompt;
  $("negative-row").hidden = !c.text_prompt;
  $("label-row").hidden = !c.class_label;
  $("edit-box").hidden = !c.start_image;
  const opts = c.sample_options;
  $("sampler").disabled = $("schedule").disabled = !opts.includes("sampler");
  $("steps").disabled = !opts.includes("steps");
  $("guidance").disabled = !opts.includes("guidance");
  $("model-info").textContent = `${m.family}: conditioning ${c.conditioning.join(", ")}; options ${opts.join(", ") || "none"}`;
}
$("model").addEventListener("change", modelChanged);

// -- generation: a job followed through its events ------------------------------------------------------
function numberOf(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

function requestParams() {
  const m = currentModel();
  if (!m) throw new Error("No image model is served; add a model folder to the server's --models folder.");
  const c = m.capabilities;
  const p = { model: m.id, n: numberOf("count") || 1, response_format: "url" };
  if (c.text_prompt) {
    p.prompt = $("prompt").value;
    if ($("negative").value.trim()) p.negative_prompt = $("negative").value;
  }
  if (c.class_label && numberOf("label") !== undefined) p.label = numberOf("label");
  if (!$("sampler").disabled && $("sampler").value) p.sampler = $("sampler").value;
  if (!$("schedule").disabled && $("schedule").value) p.schedule = $("schedule").value;
  if (!$("steps").disabled && numberOf("steps") !== undefined) p.steps = numberOf("steps");
  if (!$("guidance").disabled && numberOf("guidance") !== undefined) p.guidance_scale = numberOf("guidance");
  if (numberOf("seed") !== undefined) p.seed = numberOf("seed");
  return p;
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").disabled = !busy;
}

function setProgress(fraction, text) {
  $("progress-bar").style.width = `${Math.round(100 * fraction)}%`;
  $("status").textContent = text;
}

async function generate() {
  showError(null);
  let params;
  try { params = requestParams(); } catch (e) { showError(e); return; }
  if (edit.image && !$("edit-box").hidden) return generateEdit(params);
  setBusy(true);
  setProgress(0, "submitting…");
  try {
    const job = await (await api("/v1/jobs", { method: "POST", json: { kind: "image.generation", params } })).json();
    state.job = job.id;
    $("preview").hidden = true;
    const res = await api(`/v1/jobs/${job.id}/events`);
    await readEvents(res, (name, data) => onJobEvent(name, JSON.parse(data)));
  } catch (e) {
    showError(e);
    setProgress(0, "");
  } finally {
    state.job = null;
    setBusy(false);
    refreshQueue();
  }
}

function onJobEvent(name, d) {
  if (name === "progress") {
    const where = d.state === "queued" ? `queued (position ${d.queue_position})` : `running ${Math.round(100 * d.progress)}%`;
    setProgress(d.progress, where);
    if (d.preview) {
      $("preview").src = "data:image/png;base64," + d.preview;
      $("preview").hidden = false;
    }
  } else if (name === "done") {
    setProgress(1, `done: ${d.result.data.length} image(s) in job ${d.id}`);
    showResults(d.result.data);
    refreshGallery();
  } else if (name === "cancelled") {
    setProgress(0, `cancelled job ${d.id}`);
  } else if (name === "failed") {
    setProgress(0, "failed");
    showError(new Error("The job failed: " + (d.error || "unknown error")));
  } else if (name === "timeout") {
    setProgress(0, "no longer following the job (timeout); find it in the gallery when it ends");
  }
}

function showResults(items) {
  const box = $("results");
  box.innerHTML = "";
  for (const item of items) {
    box.append(card({ id: item.id, url: item.url || `/v1/outputs/${item.id}`, seed: item.seed, params: item.params,
      blocked: item.blocked }, false));
    state.lastSeed = item.seed;
  }
}

$("generate").addEventListener("click", generate);
$("cancel").addEventListener("click", async () => {
  if (!state.job) return;
  try { await api(`/v1/jobs/${state.job}`, { method: "DELETE" }); } catch (e) { showError(e); }
});
$("seed-random").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 2 ** 31); });
$("seed-reuse").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });

// -- cards: results and the gallery ---------------------------------------------------------------------
function card(item, inGallery) {
  const div = document.createElement("div");
  div.className = "card" + (item.blocked ? " blocked" : "");
  div.dataset.id = item.id;
  const img = document.createElement("img");
  img.alt = `output ${item.id}`;
  loadImage(img, item.url).catch(showError);
  const seed = document.createElement("div");
  seed.className = "seed";
  seed.textContent = `seed ${item.seed}`;
  div.append(img, seed);
  if (item.blocked) {
    const flag = document.createElement("div");
    flag.className = "flag";
    const concept = item.params && item.params.safety ? item.params.safety.concept : null;
    flag.textContent = "blocked by the output checker" + (concept ? `: ${concept}` : "");
    div.append(flag);
  }
  const params = document.createElement("div");
  params.className = "params";
  params.textContent = describe(item.params);
  const row = document.createElement("div");
  row.className = "row";
  row.append(button("reuse", () => reuse(item.params)), button("download", () => download(item)));
  if (inGallery) row.append(button("delete", () => remove(item.id)));
  div.append(params, row);
  return div;
}

function button(text, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "small " + text;
  b.textContent = text;
  b.addEventListener("click", onClick);
  return b;
}

function describe(p) {
  if (!p) return "";
  const keys = ["model", "prompt", "negative", "label", "sampler", "schedule", "steps", "cfg", "strength", "model_hash"];
  return keys.filter((k) => p[k] !== null && p[k] !== undefined).map((k) => `${k}: ${p[k]}`).join("\n");
}

function reuse(p) {
  if (!p) return;
  if (state.models.some((m) => m.id === p.model)) { $("model").value = p.model; modelChanged(); }
  $("prompt").value = p.prompt || "";
  $("negative").value = typeof p.negative === "string" ? p.negative : "";
  $("label").value = p.label ?? "";
  $("sampler").value = p.sampler || "";
  $("schedule").value = p.schedule || "";
  $("steps").value = p.steps ?? "";
  $("guidance").value = p.cfg ?? "";
  $("seed").value = p.seed ?? "";
  $("count").value = 1;
}

async function download(item) {
  try {
    const blob = await (await api(item.url)).blob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = `${item.id}.png`;
    a.click();
  } catch (e) { showError(e); }
}

async function remove(id) {
  try {
    await api(`/v1/outputs/${id}`, { method: "DELETE" });
    refreshGallery();
  } catch (e) { showError(e); }
}

async function refreshGallery() {
  try {
    const offset = state.page * state.pageSize;
    const page = await (await api(`/v1/outputs?limit=${state.pageSize}&offset=${offset}`)).json();
    const box = $("gallery");
    box.innerHTML = "";
    for (const item of page.data) box.append(card(item, true));
    const pages = Math.max(1, Math.ceil(page.total / state.pageSize));
    $("gallery-page").textContent = `page ${state.page + 1} of ${pages} (${page.total} images)`;
    $("gallery-prev").disabled = state.page === 0;
    $("gallery-next").disabled = state.page + 1 >= pages;
  } catch (e) { showError(e); }
}
$("gallery-prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); refreshGallery(); });
$("gallery-next").addEventListener("click", () => { state.page += 1; refreshGallery(); });

async function refreshQueue() {
  try {
    const jobs = (await (await api("/v1/queue")).json()).data;
    const body = $("queue").tBodies[0];
    body.innerHTML = "";
    for (const j of jobs) {
      const tr = body.insertRow();
      for (const v of [j.id.slice(0, 12) + "…", j.model, j.state, j.queue_position ?? "", `${Math.round(100 * j.progress)}%`]) {
        tr.insertCell().textContent = v;
      }
    }
    if (!jobs.length) body.insertRow().insertCell().textContent = "empty";
  } catch (e) { /* the queue is a convenience: errors show on actions */ }
}
$("queue-refresh").addEventListener("click", refreshQueue);
setInterval(() => { if (!$("tab-image").hidden) refreshQueue(); }, 3000);

// -- img2img and the inpainting mask --------------------------------------------------------------------
const edit = { image: null, painting: false };
const maskCtx = $("mask-canvas").getContext("2d");
const imageCtx = $("edit-canvas").getContext("2d");

$("strength").addEventListener("input", () => { $("strength-value").textContent = $("strength").value; });
$("edit-image").addEventListener("change", async () => {
  const file = $("edit-image").files[0];
  if (!file) return;
  const bitmap = await createImageBitmap(file);
  edit.image = file;
  for (const c of [$("edit-canvas"), $("mask-canvas")]) { c.width = bitmap.width; c.height = bitmap.height; }
  const scale = 256 / Math.max(bitmap.width, bitmap.height);
  for (const c of [$("edit-canvas"), $("mask-canvas")]) {
    c.style.width = `${bitmap.width * scale}px`;
    c.style.height = `${bitmap.height * scale}px`;
  }
  imageCtx.drawImage(bitmap, 0, 0);
  maskCtx.clearRect(0, 0, bitmap.width, bitmap.height);
});
$("edit-remove").addEventListener("click", () => {
  edit.image = null;
  $("edit-image").value = "";
  imageCtx.clearRect(0, 0, $("edit-canvas").width, $("edit-canvas").height);
  maskCtx.clearRect(0, 0, $("mask-canvas").width, $("mask-canvas").height);
});
$("mask-clear").addEventListener("click", () => maskCtx.clearRect(0, 0, $("mask-canvas").width, $("mask-canvas").height));

function paint(ev) {
  const c = $("mask-canvas");
  const r = c.getBoundingClientRect();
  const x = (ev.clientX - r.left) * (c.width / r.width);
  const y = (ev.clientY - r.top) * (c.height / r.height);
  const radius = Number($("brush").value) * (c.width / r.width) / 2;
  maskCtx.globalCompositeOperation = $("eraser").checked ? "destination-out" : "source-over";
  maskCtx.fillStyle = "#ff00ff";
  maskCtx.beginPath();
  maskCtx.arc(x, y, Math.max(0.5, radius), 0, 2 * Math.PI);
  maskCtx.fill();
}
$("mask-canvas").addEventListener("pointerdown", (ev) => { edit.painting = true; paint(ev); });
$("mask-canvas").addEventListener("pointermove", (ev) => { if (edit.painting) paint(ev); });
window.addEventListener("pointerup", () => { edit.painting = false; });

function maskBlob() {
  // OpenAI's mask convention (a browser's PNG always has alpha): transparent = draw anew, opaque = keep;
  // nothing painted: img2img (no mask)
  const c = $("mask-canvas");
  const painted = maskCtx.getImageData(0, 0, c.width, c.height).data;
  let any = false;
  const out = document.createElement("canvas");
  out.width = c.width; out.height = c.height;
  const octx = out.getContext("2d");
  const img = octx.createImageData(c.width, c.height);
  for (let i = 0; i < painted.length; i += 4) {
    const on = painted[i + 3] > 0;
    any = any || on;
    img.data[i] = img.data[i + 1] = img.data[i + 2] = 0;
    img.data[i + 3] = on ? 0 : 255;
  }
  octx.putImageData(img, 0, 0);
  return any ? new Promise((resolve) => out.toBlob(resolve, "image/png")) : Promise.resolve(null);
}

async function generateEdit(params) {
  setBusy(true);
  $("cancel").disabled = true;  // an edit is one synchronous request: it cannot be followed or cancelled here
  setProgress(0.5, "editing…");
  try {
    const form = new FormData();
    form.append("image", edit.image, edit.image.name || "image.png");
    const mask = await maskBlob();
    if (mask) form.append("mask", mask, "mask.png");
    for (const [k, v] of Object.entries(params)) form.append(k, String(v));
    form.append("strength", $("strength").value);
    if (!form.has("prompt")) form.append("prompt", "");
    const res = await (await api("/v1/images/edits", { method: "POST", body: form })).json();
    setProgress(1, `done: ${res.data.length} image(s) in job ${res.job}`);
    showResults(res.data);
    refreshGallery();
  } catch (e) {
    showError(e);
    setProgress(0, "");
  } finally {
    setBusy(false);
  }
}

// -- text: a playground and a chat, both streamed --------------------------------------------------------
function textParams() {
  return { model: $("text-model").value, max_tokens: numberOf("max-tokens") || 64,
    temperature: numberOf("temperature") ?? 1, stream: true };
}

async function streamText(path, body, onDelta) {
  showError(null);
  state.textAbort = new AbortController();
  $("text-stop").disabled = false;
  try {
    const res = await api(path, { method: "POST", json: body, signal: state.textAbort.signal });
    await readEvents(res, (name, data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const c of chunk.choices || []) onDelta(c.text ?? (c.delta && c.delta.content) ?? "");
    });
  } catch (e) {
    if (e.name !== "AbortError") showError(e);
  } finally {
    state.textAbort = null;
    $("text-stop").disabled = true;
  }
}

$("complete").addEventListener("click", () => {
  const out = $("completion-out");
  out.textContent = $("completion-prompt").value;
  streamText("/v1/completions", { ...textParams(), prompt: $("completion-prompt").value },
    (t) => { out.textContent += t; });
});
$("text-stop").addEventListener("click", () => { if (state.textAbort) state.textAbort.abort(); });

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const who = document.createElement("b");
  who.textContent = role + ": ";
  const span = document.createElement("span");
  span.textContent = text;
  div.append(who, span);
  $("chat-log").append(div);
  return span;
}

function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = reject;
    r.readAsDataURL(file);
  });
}

$("chat-send").addEventListener("click", async () => {
  const text = $("chat-input").value;
  if (!text.trim()) return;
  const file = $("chat-image").files[0];
  const content = file ? [{ type: "text", text }, { type: "image_url", image_url: { url: await dataUrl(file) } }] : text;
  state.chat.push({ role: "user", content });
  addMessage("user", text + (file ? " [image]" : ""));
  $("chat-input").value = "";
  $("chat-image").value = "";
  const span = addMessage("assistant", "");
  await streamText("/v1/chat/completions", { ...textParams(), messages: state.chat }, (t) => { span.textContent += t; });
  state.chat.push({ role: "assistant", content: span.textContent });
});
$("chat-reset").addEventListener("click", () => { state.chat = []; $("chat-log").innerHTML = ""; });

// -- tabs ---------------------------------------------------------------------------------------------
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t === tab);
    $("tab-image").hidden = tab.dataset.tab !== "image";
    $("tab-text").hidden = tab.dataset.tab !== "text";
  });
}

init();
