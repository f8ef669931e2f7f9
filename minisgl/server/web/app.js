// The chat page: conversations in localStorage, answers streamed from the server (api.js), rendered by
// markdown.js.
// Invariants: model output reaches the DOM only through renderMarkdown / textContent (never innerHTML);
// every request ends in a visible state (answer, "stopped", or an error message in the conversation).
"use strict";

(function () {
  const CHATS_KEY = "minisgl.chats.v1";
  const CURRENT_KEY = "minisgl.current.v1";
  const SETTINGS_KEY = "minisgl.settings.v1";
  const DEFAULTS = { system: "", temperature: 0.7, top_p: 0.95, max_tokens: 1024 };
  const STATUS_EVERY_MS = 2000;

  const $ = (id) => document.getElementById(id);
  const ui = {
    sidebar: $("sidebar"), scrim: $("scrim"), menu: $("menu"), list: $("conversations"), newChat: $("new-chat"),
    title: $("conv-title"), model: $("model"), messages: $("messages"), composer: $("composer"), input: $("input"),
    send: $("send"), stop: $("stop"), status: $("status"), settings: $("settings"), openSettings: $("open-settings"),
    system: $("system-prompt"), temperature: $("temperature"), topP: $("top-p"), maxTokens: $("max-tokens"),
    settingsReset: $("settings-reset"), keyDialog: $("key-dialog"), keyInput: $("api-key"), keyReason: $("key-reason"),
  };

  // ---- state ---------------------------------------------------------------------------------------------
  let chats = load(CHATS_KEY, []);
  let currentId = localStorage.getItem(CURRENT_KEY);
  let settings = Object.assign({}, DEFAULTS, load(SETTINGS_KEY, {}));
  let modelName = null;
  let streaming = null; // {chatId, controller} while an answer is being generated

  function load(key, fallback) {
    try {
      const v = JSON.parse(localStorage.getItem(key));
      return v === null ? fallback : v;
    } catch (e) {
      return fallback;
    }
  }

  function save() {
    localStorage.setItem(CHATS_KEY, JSON.stringify(chats));
    if (currentId) localStorage.setItem(CURRENT_KEY, currentId);
  }

  function newId() {
    return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
  }

  function current() {
    let c = chats.find((x) => x.id === currentId);
    if (!c) {
      c = { id: newId(), title: "New chat", messages: [], updated: Date.now() };
      chats.unshift(c);
      currentId = c.id;
    }
    return c;
  }

  // ---- server --------------------------------------------------------------------------------------------
  const api = window.minisglApi;
  let keyPrompt = null; // one dialog at a time, shared by every caller that got a 401

  function askKey(reason) { // the key dialog: resolves to the key entered, or null
    if (keyPrompt) return keyPrompt;
    keyPrompt = new Promise((resolve) => {
      ui.keyReason.textContent = reason;
      ui.keyInput.value = "";
      ui.keyDialog.returnValue = ""; // Escape keeps the previous value
      ui.keyDialog.addEventListener("close", function onClose() {
        ui.keyDialog.removeEventListener("close", onClose);
        const key = ui.keyDialog.returnValue === "ok" ? ui.keyInput.value.trim() : "";
        keyPrompt = null;
        resolve(key || null);
      });
      ui.keyDialog.showModal();
      ui.keyInput.focus();
    });
    return keyPrompt;
  }
  api.setKeyPrompt(askKey);

  async function loadModel() {
    try {
      const body = await api.getJSON("/v1/models");
      modelName = body.data && body.data.length ? body.data[0].id : null;
      ui.model.textContent = modelName || "no model";
      ui.model.title = body.data && body.data[0] && body.data[0].root ? body.data[0].root : "";
    } catch (e) {
      ui.model.textContent = "model unknown";
    }
  }

  let statusTimer = null;
  async function pollStatus() {
    clearTimeout(statusTimer);
    try {
      const r = await fetch("/status", { headers: api.headers(false) });
      if (r.status === 401) {
        ui.status.textContent = "locked: the API key is needed";
      } else if (!r.ok) {
        ui.status.textContent = "status unavailable";
      } else {
        const s = await r.json();
        const busy = s.num_running_reqs > 0 || s.num_queue_reqs > 0;
        ui.status.dataset.running = s.num_running_reqs;
        ui.status.dataset.queued = s.num_queue_reqs;
        ui.status.classList.toggle("busy", busy);
        ui.status.classList.remove("down");
        ui.status.textContent = `${busy ? "busy" : "idle"} · ${s.num_running_reqs} running · ` +
          `${s.num_queue_reqs} queued · KV ${(100 * s.token_usage).toFixed(0)}% · ` +
          `context ${s.max_model_len} tokens`;
      }
    } catch (e) {
      ui.status.classList.add("down");
      ui.status.textContent = "server unreachable";
    }
    statusTimer = setTimeout(pollStatus, document.hidden ? 4 * STATUS_EVERY_MS : STATUS_EVERY_MS);
  }

  // ---- rendering -----------------------------------------------------------------------------------------
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function renderList() {
    ui.list.replaceChildren();
    for (const c of chats) {
      const li = el("li", "conv" + (c.id === currentId ? " active" : ""));
      li.dataset.id = c.id;
      const open = el("button", "conv-open", c.title || "New chat");
      open.type = "button";
      open.title = c.title;
      if (c.id === currentId) open.setAttribute("aria-current", "true");
      open.addEventListener("click", () => switchTo(c.id));
      const rename = el("button", "icon-btn small", "✎");
      rename.type = "button";
      rename.setAttribute("aria-label", `Rename “${c.title}”`);
      rename.addEventListener("click", () => startRename(li, c));
      const del = el("button", "icon-btn small", "✕");
      del.type = "button";
      del.setAttribute("aria-label", `Delete “${c.title}”`);
      del.addEventListener("click", () => remove(c.id));
      li.append(open, rename, del);
      ui.list.appendChild(li);
    }
  }

  function startRename(li, c) {
    const input = el("input", "conv-rename");
    input.value = c.title;
    input.setAttribute("aria-label", "New name");
    li.replaceChildren(input);
    input.focus();
    input.select();
    let done = false;
    const finish = (keep) => {
      if (done) return;
      done = true;
      if (keep && input.value.trim()) {
        c.title = input.value.trim().slice(0, 80);
        save();
      }
      renderList();
      renderTitle();
      const again = ui.list.querySelector(`li[data-id="${c.id}"] .conv-open`);
      if (again) again.focus();
    };
    input.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") { ev.preventDefault(); finish(true); }
      if (ev.key === "Escape") { ev.preventDefault(); finish(false); }
    });
    input.addEventListener("blur", () => finish(true));
  }

  function renderTitle() {
    const c = current();
    ui.title.textContent = c.title || "New chat";
    document.title = (c.title && c.title !== "New chat" ? c.title + " · " : "") + "minisgl chat";
  }

  function fmt(x, digits) {
    return Number.isFinite(x) ? x.toFixed(digits) : "–";
  }

  function metaText(m) {
    const s = m.stats || {};
    const parts = [];
    if (s.ttft !== undefined) parts.push(`TTFT ${fmt(s.ttft, 2)} s`);
    if (s.tps !== undefined) parts.push(`${fmt(s.tps, 1)} tok/s`);
    if (s.tokens !== undefined) parts.push(`${s.tokens} tokens${s.counted ? " (counted)" : ""}`);
    if (m.stopped) parts.push("stopped");
    else if (s.finish === "length") parts.push("cut at max tokens");
    return parts.join(" · ");
  }

  function messageNode(m, index, last) {
    const node = el("article", `msg ${m.role}`);
    node.dataset.index = index;
    if (m.role === "error") {
      node.setAttribute("role", "alert");
      node.appendChild(el("div", "msg-body", m.content));
      return node;
    }
    node.appendChild(el("div", "msg-role", m.role === "user" ? "You" : "Assistant"));
    const body = el("div", "msg-body");
    if (m.role === "assistant") {
      body.appendChild(window.renderMarkdown(m.content));
      if (m.pending && !m.content) body.appendChild(el("span", "typing", "…"));
      else if (!m.content && !m.stopped) body.appendChild(el("span", "muted", "(the model returned no text)"));
    } else {
      body.textContent = m.content;
    }
    node.appendChild(body);
    if (m.role === "assistant" && !m.pending) {
      const foot = el("div", "msg-foot");
      foot.appendChild(el("span", "msg-meta", metaText(m)));
      if (last) {
        const regen = el("button", "btn small", "↻ Regenerate");
        regen.type = "button";
        regen.classList.add("regenerate");
        regen.setAttribute("aria-label", "Regenerate the last answer");
        regen.addEventListener("click", regenerate);
        foot.appendChild(regen);
      }
      node.appendChild(foot);
    }
    return node;
  }

  function lastAssistantIndex(c) {
    for (let i = c.messages.length - 1; i >= 0; i--) {
      if (c.messages[i].role === "user") return -1;
      if (c.messages[i].role === "assistant") return i;
    }
    return -1;
  }

  let scrollDown = false; // set when the user sends: follow the new answer even if they had scrolled up

  function renderMessages() {
    const c = current();
    const atBottom = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 40;
    ui.messages.replaceChildren();
    if (!c.messages.length) {
      const empty = el("div", "empty");
      empty.appendChild(el("h2", null, "What can I help with?"));
      empty.appendChild(el("p", null, "Answers stream from this server. Enter sends, Shift+Enter adds a line, " +
        "Esc stops an answer. Settings (⚙) hold the system prompt and sampling."));
      ui.messages.appendChild(empty);
      return;
    }
    const lastA = streaming ? -1 : lastAssistantIndex(c);
    c.messages.forEach((m, i) => ui.messages.appendChild(messageNode(m, i, i === lastA)));
    if (atBottom || scrollDown) ui.messages.scrollTop = ui.messages.scrollHeight;
    scrollDown = false;
  }

  function renderAll() {
    renderList();
    renderTitle();
    renderMessages();
    setBusy(!!streaming); // one answer at a time, whichever conversation is shown
  }

  let rafPending = false;
  function renderSoon(c, answer) { // at most once per frame while tokens stream in, and only the answer's node
    if (rafPending) return;
    rafPending = true;
    requestAnimationFrame(() => {
      rafPending = false;
      if (c.id !== currentId || !answer.pending) return; // a finished answer was already rendered in full
      const index = c.messages.indexOf(answer);
      const old = ui.messages.querySelector(`.msg[data-index="${index}"]`);
      if (!old) return renderMessages();
      const atBottom = ui.messages.scrollHeight - ui.messages.scrollTop - ui.messages.clientHeight < 40;
      old.replaceWith(messageNode(answer, index, false));
      if (atBottom) ui.messages.scrollTop = ui.messages.scrollHeight;
    });
  }

  function setBusy(busy) {
    ui.send.hidden = busy;
    ui.stop.hidden = !busy;
    ui.messages.setAttribute("aria-busy", busy ? "true" : "false");
    document.body.classList.toggle("generating", busy);
  }

  // ---- conversations -------------------------------------------------------------------------------------
  function switchTo(id) {
    currentId = id;
    save();
    closeSidebar();
    renderAll();
    ui.input.focus();
  }

  function newChat() {
    const c = current();
    if (c.messages.length || streaming) {
      const n = { id: newId(), title: "New chat", messages: [], updated: Date.now() };
      chats.unshift(n);
      currentId = n.id;
    }
    save();
    closeSidebar();
    renderAll();
    ui.input.focus();
  }

  function remove(id) {
    if (streaming && streaming.chatId === id) streaming.controller.abort();
    chats = chats.filter((c) => c.id !== id);
    if (currentId === id) currentId = chats.length ? chats[0].id : null;
    current();
    save();
    renderAll();
  }

  // ---- generation ----------------------------------------------------------------------------------------
  function requestBody(c) {
    const messages = [];
    if (settings.system.trim()) messages.push({ role: "system", content: settings.system });
    for (const m of c.messages) {
      if ((m.role === "user" || m.role === "assistant") && m.content) {
        messages.push({ role: m.role, content: m.content });
      }
    }
    const body = { messages, stream: true, stream_options: { include_usage: true },
                   temperature: settings.temperature, top_p: settings.top_p };
    if (modelName) body.model = modelName;
    if (settings.max_tokens) body.max_tokens = settings.max_tokens;
    return body;
  }

  async function generate(c) {
    const answer = { role: "assistant", content: "", pending: true, stats: {} };
    c.messages.push(answer);
    c.updated = Date.now();
    const controller = new AbortController();
    streaming = { chatId: c.id, controller };
    save();
    renderAll();
    const t0 = performance.now();
    let tFirst = null;
    let chunks = 0;
    let done = false;
    try {
      await api.streamChat(requestBody(c), controller.signal, (obj) => {
        const choice = obj.choices && obj.choices[0];
        if (choice && choice.delta && choice.delta.content) {
          if (tFirst === null) tFirst = performance.now();
          answer.content += choice.delta.content;
          chunks++;
          renderSoon(c, answer);
        }
        if (choice && choice.finish_reason) answer.stats.finish = choice.finish_reason;
        if (obj.usage) answer.stats.tokens = obj.usage.completion_tokens;
      });
      done = true;
    } catch (e) {
      if (e.name === "AbortError") {
        answer.stopped = true;
      } else {
        const msg = e instanceof api.ServerError ? e.message
          : "Could not reach the server (it may have stopped, or the connection dropped): " + e.message;
        c.messages.push({ role: "error", content: msg });
      }
    } finally {
      const tEnd = performance.now();
      answer.pending = false;
      if (tFirst !== null) {
        if (answer.stats.tokens === undefined) {
          answer.stats.tokens = chunks; // no usage (stopped early): one chunk is about one token
          answer.stats.counted = true;
        }
        answer.stats.ttft = (tFirst - t0) / 1000;
        const span = (tEnd - tFirst) / 1000;
        if (answer.stats.tokens > 1 && span > 0) answer.stats.tps = (answer.stats.tokens - 1) / span;
      }
      if (!answer.content && !answer.stopped && !done) c.messages.splice(c.messages.indexOf(answer), 1);
      streaming = null;
      save();
      renderAll();
      pollStatus();
      if (!modelName) loadModel(); // the key may have been entered only now
    }
  }

  function titleFrom(text) {
    const t = text.replace(/\s+/g, " ").trim();
    return t.length > 40 ? t.slice(0, 39) + "…" : t || "New chat";
  }

  function send() {
    const text = ui.input.value;
    if (!text.trim() || streaming) return;
    const c = current();
    if (!c.messages.length && c.title === "New chat") c.title = titleFrom(text);
    c.messages.push({ role: "user", content: text });
    scrollDown = true;
    ui.input.value = "";
    autosize();
    generate(c);
  }

  function regenerate() {
    if (streaming) return;
    const c = current();
    while (c.messages.length && c.messages[c.messages.length - 1].role !== "user") c.messages.pop();
    scrollDown = true;
    if (c.messages.length) generate(c);
    ui.input.focus();
  }

  function stop() {
    if (streaming) streaming.controller.abort();
  }

  // ---- settings ------------------------------------------------------------------------------------------
  function fillSettings() {
    ui.system.value = settings.system;
    ui.temperature.value = settings.temperature;
    ui.topP.value = settings.top_p;
    ui.maxTokens.value = settings.max_tokens || "";
  }

  function readSettings() {
    const num = (input, fallback) => {
      const v = parseFloat(input.value);
      return Number.isFinite(v) ? v : fallback;
    };
    const maxTokens = parseInt(ui.maxTokens.value, 10);
    settings = {
      system: ui.system.value,
      temperature: num(ui.temperature, DEFAULTS.temperature),
      top_p: num(ui.topP, DEFAULTS.top_p),
      max_tokens: Number.isFinite(maxTokens) && maxTokens > 0 ? maxTokens : null,
    };
    localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
  }

  // ---- layout and keyboard -------------------------------------------------------------------------------
  function autosize() {
    ui.input.style.height = "auto";
    ui.input.style.height = Math.min(ui.input.scrollHeight, 220) + "px";
  }

  function openSidebar() {
    ui.sidebar.classList.add("open");
    ui.scrim.hidden = false;
    ui.menu.setAttribute("aria-expanded", "true");
    const first = ui.sidebar.querySelector("button");
    if (first) first.focus();
  }

  function closeSidebar() {
    if (!ui.sidebar.classList.contains("open")) return;
    ui.sidebar.classList.remove("open");
    ui.scrim.hidden = true;
    ui.menu.setAttribute("aria-expanded", "false");
  }

  ui.composer.addEventListener("submit", (ev) => {
    ev.preventDefault();
    send();
  });
  ui.input.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      send();
    }
  });
  ui.input.addEventListener("input", autosize);
  ui.stop.addEventListener("click", () => {
    stop();
    ui.input.focus();
  });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && streaming && !ui.settings.open && !ui.keyDialog.open) stop();
    if (ev.key === "Escape") closeSidebar();
  });
  $("key-cancel").addEventListener("click", () => ui.keyDialog.close("cancel"));
  ui.newChat.addEventListener("click", newChat);
  ui.menu.addEventListener("click", () => (ui.sidebar.classList.contains("open") ? closeSidebar() : openSidebar()));
  ui.scrim.addEventListener("click", closeSidebar);
  ui.openSettings.addEventListener("click", () => {
    fillSettings();
    ui.settings.showModal();
  });
  ui.settings.addEventListener("close", () => {
    if (ui.settings.returnValue === "save") readSettings();
    ui.settings.returnValue = "";
    ui.input.focus();
  });
  ui.settingsReset.addEventListener("click", () => {
    settings = Object.assign({}, DEFAULTS);
    fillSettings();
  });
  window.addEventListener("storage", (ev) => { // another tab changed the conversations
    if (ev.key === CHATS_KEY && !streaming) {
      chats = load(CHATS_KEY, []);
      renderAll();
    }
  });

  // A reload mid-answer leaves a pending message behind: mark it as interrupted.
  for (const c of chats) {
    for (const m of c.messages) {
      if (m.pending) {
        m.pending = false;
        m.stopped = true;
      }
    }
  }
  current();
  save();
  renderAll();
  ui.input.focus();
  loadModel().then(pollStatus);
})();
