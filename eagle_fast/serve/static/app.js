// The chat page: keeps the conversation here (the server is stateless), sends it whole to
// /v1/chat/completions with stream: true and renders the answer as it arrives. Model output is
// only ever set as textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "eagle_fast.apiKey";
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif"];

const state = {
  history: [],      // OpenAI messages of the finished turns
  pending: [],      // data URLs of the images attached to the next message
  controller: null, // AbortController of the answer being streamed
};

function apiKey() { return localStorage.getItem(KEY_STORAGE) || ""; }

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("api-key").focus();
  showError(message || "This server needs an API key.");
}

async function errorText(response) {
  // OpenAI-style {"error": {"message": ...}}, or whatever the body is
  const body = await response.text();
  try { return JSON.parse(body).error.message; } catch (e) { return body || response.statusText; }
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (r.status === 401) { $("model").textContent = ""; askForKey(await errorText(r)); return; }
    if (!r.ok) throw new Error(await errorText(r));
    $("model").textContent = (await r.json()).data.map((m) => m.id).join(", ");
    $("key-form").hidden = true;
  } catch (e) {
    $("model").textContent = "offline";
    showError("Cannot reach the server: " + e.message);
  }
}

// ---- conversation view -------------------------------------------------------------------

function addMessage(role, text, images) {
  const box = document.createElement("div");
  box.className = "msg " + role;
  for (const url of images || []) {
    const img = document.createElement("img");
    img.src = url;
    img.alt = "attached image";
    box.appendChild(img);
  }
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  box.appendChild(content);
  $("messages").appendChild(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

function addNote(box, text) {
  const note = document.createElement("div");
  note.className = "note";
  note.textContent = text;
  box.appendChild(note);
}

function renderAttachments() {
  const row = $("attachments");
  row.replaceChildren();
  state.pending.forEach((url, i) => {
    const thumb = document.createElement("div");
    thumb.className = "thumb";
    const img = document.createElement("img");
    img.src = url;
    img.alt = "image to send";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "Remove";
    remove.addEventListener("click", () => { state.pending.splice(i, 1); renderAttachments(); });
    thumb.append(img, remove);
    row.appendChild(thumb);
  });
}

function attach(files) {
  for (const file of files) {
    if (!IMAGE_TYPES.includes(file.type)) { showError(`${file.name || "file"}: not a PNG, JPEG, WebP or GIF image`); continue; }
    const reader = new FileReader();
    reader.onload = () => { state.pending.push(reader.result); renderAttachments(); };
    reader.onerror = () => showError(`${file.name}: cannot be read`);
    reader.readAsDataURL(file);
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

// ---- talking to the server ---------------------------------------------------------------

function requestBody(messages) {
  const body = { messages, stream: true };
  const system = $("system").value.trim();
  if (system) body.messages = [{ role: "system", content: system }, ...messages];
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

// Reads server-sent events from the response; calls onData with each parsed data: payload.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      onData(JSON.parse(data));
    }
  }
}

async function send() {
  const text = $("prompt").value.trim();
  const images = state.pending.slice();
  if (!text && !images.length) return;
  showError("");
  const content = [...images.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text }];
  const userMessage = { role: "user", content: images.length ? content : text };
  addMessage("user", text, images);
  $("prompt").value = "";
  state.pending = [];
  renderAttachments();

  const box = addMessage("assistant", "", []);
  box.classList.add("pending");
  const out = box.querySelector(".content");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let answer = "", finish = null, failed = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify(requestBody([...state.history, userMessage])),
    });
    if (response.status === 401) { failed = true; askForKey(await errorText(response)); }
    else if (!response.ok) { failed = true; showError(`Error ${response.status}: ${await errorText(response)}`); }
    else {
      await readEvents(response, (event) => {
        if (event.error) { failed = true; showError(event.error.message); return; }
        const choice = event.choices && event.choices[0];
        if (!choice) return;
        if (choice.delta && choice.delta.content) {
          answer += choice.delta.content;
          out.textContent = answer;
          box.scrollIntoView({ block: "end" });
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      });
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else { failed = true; showError("Connection failed: " + e.message); }
  } finally {
    box.classList.remove("pending");
    state.controller = null;
    setBusy(false);
  }
  if (failed && !answer) {
    box.remove();
    $("messages").lastElementChild?.remove(); // the user turn goes back into the box
    $("prompt").value = text;
    state.pending = images;
    renderAttachments();
    return;
  }
  if (finish === "stopped") addNote(box, "(stopped)");
  else if (finish === "length") addNote(box, "(cut at the token limit)");
  state.history.push(userMessage, { role: "assistant", content: answer });
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stop();
  state.history = [];
  state.pending = [];
  renderAttachments();
  $("messages").replaceChildren();
  showError("");
  $("prompt").focus();
}

// ---- wiring ------------------------------------------------------------------------------

function init() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); if (!state.controller) send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("file").addEventListener("change", (e) => { attach(e.target.files); e.target.value = ""; });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    $("api-key").value = "";
    showError("");
    loadModel();
  });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.files || [])].filter((f) => f.type.startsWith("image/"));
    if (files.length) { e.preventDefault(); attach(files); }
  });
  let depth = 0; // dragenter/leave fire for every child element crossed
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; document.body.classList.add("dragging"); });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; document.body.classList.remove("dragging"); } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    document.body.classList.remove("dragging");
    attach(e.dataTransfer.files);
  });
  loadModel();
  $("prompt").focus();
}

document.addEventListener("DOMContentLoaded", init);
