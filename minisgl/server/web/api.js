// The server's API as the page uses it: the API key (sessionStorage, the tab's lifetime), JSON GETs, and chat
// completions streamed as server-sent events. A 401 asks the page for the key (setKeyPrompt) and retries once.
"use strict";

(function () {
  const API_KEY = "minisgl.apiKey";
  let askKey = async () => null; // the page's key dialog: resolves to the key entered, or null

  class ServerError extends Error {} // the server answered with an error: its message is for the reader

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    const key = sessionStorage.getItem(API_KEY);
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  function keyReason() {
    return sessionStorage.getItem(API_KEY)
      ? "The server refused this key. Enter the key the server was started with (--api-key)."
      : "This server was started with --api-key. Enter the key; it is kept for this tab only.";
  }

  async function withKey(send) { // send() once; on a 401, once more after the key is entered
    let r = await send();
    if (r.status === 401) {
      const key = await askKey(keyReason());
      if (key) {
        sessionStorage.setItem(API_KEY, key);
        r = await send();
      }
    }
    return r;
  }

  async function errorText(r) {
    let msg = "";
    try {
      const body = await r.json();
      msg = (body.error && body.error.message) || JSON.stringify(body);
    } catch (e) {
      msg = r.statusText;
    }
    const what = { 400: "Bad request", 401: "Unauthorized", 404: "Not found", 408: "Timed out",
                   429: "Too many requests", 503: "Server busy" }[r.status] || "Server error";
    return `${what} (HTTP ${r.status}): ${msg}`;
  }

  async function getJSON(path) {
    const r = await withKey(() => fetch(path, { headers: headers(false) }));
    if (!r.ok) throw new ServerError(await errorText(r));
    return r.json();
  }

  // POST a chat completion with stream: true and call onChunk(obj) for every event's JSON. Resolves when
  // [DONE] arrives; throws ServerError for an HTTP error, an error event, or a stream cut short, and the
  // fetch's own errors (AbortError when `signal` aborts, TypeError when the server is unreachable).
  async function streamChat(body, signal, onChunk) {
    const data = JSON.stringify(body);
    const resp = await withKey(() => fetch("/v1/chat/completions", {
      method: "POST", headers: headers(true), body: data, signal,
    }));
    if (!resp.ok) throw new ServerError(await errorText(resp));
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const payload = line.slice(5).trim();
          if (payload === "[DONE]") return;
          const obj = JSON.parse(payload);
          if (obj.error) throw new ServerError(`Server error: ${obj.error.message}`);
          onChunk(obj);
        }
      }
    }
    throw new ServerError("The connection to the server dropped before the answer finished.");
  }

  window.minisglApi = {
    ServerError, headers, getJSON, streamChat,
    setKeyPrompt(fn) { askKey = fn; },
  };
})();
