// What the three pages share: the API client (the key kept in localStorage, sent as
// Bearer), the events stream read with fetch (EventSource cannot send a header), error
// boxes that name the field at fault, the navigation, and small formatters.
import { h, render } from "preact";
import { useEffect, useState } from "preact/hooks";
import htm from "htm";

export const html = htm.bind(h);
export const config = JSON.parse(document.getElementById("stipple-config").textContent);

const KEY = "stipple.apiKey";

export function apiKey() {
  return localStorage.getItem(KEY) || "";
}

export function setApiKey(value) {
  if (value) localStorage.setItem(KEY, value);
  else localStorage.removeItem(KEY);
}

/** A refusal of the API: its status and the native error body's code, message, field, value. */
export class ApiError extends Error {
  constructor(status, body, path) {
    const detail = (body && body.error) || {};
    super(detail.message || `${path}: HTTP ${status}`);
    this.status = status;
    this.code = detail.code || "http_error";
    this.field = detail.field;
    this.value = detail.value;
  }
}

function headers(extra) {
  const out = { ...(extra || {}) };
  const key = apiKey();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

export async function api(path, { json, headers: extra, ...options } = {}) {
  const init = { ...options, headers: headers(extra) };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  const response = await fetch(path, init);
  if (!response.ok) {
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    throw new ApiError(response.status, body, path);
  }
  return response;
}

export async function apiJson(path, options) {
  return (await api(path, options)).json();
}

/** Server-Sent Events from `path`, as {event, data (parsed JSON), id}, until the stream ends. */
export async function* events(path, signal) {
  const response = await api(path, { signal, headers: { Accept: "text/event-stream" } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const frame = { event: "message", data: "", id: "" };
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (name === "data") frame.data += (frame.data ? "\n" : "") + text;
        else if (name === "event") frame.event = text;
        else if (name === "id") frame.id = text;
      }
      if (!frame.data) continue;
      try {
        frame.data = JSON.parse(frame.data);
      } catch (_) {
        // not JSON: kept as text
      }
      yield frame;
    }
  }
}

/** An image URL of the API as an <img> can show it: itself, or (with an API key, which an
 *  <img> cannot send) an object URL of the bytes fetched with the key. */
export function useImageSrc(url) {
  const keyed = Boolean(apiKey());
  const [src, setSrc] = useState(keyed ? "" : url);
  useEffect(() => {
    if (!keyed) {
      setSrc(url);
      return undefined;
    }
    let objectUrl = "";
    let gone = false;
    api(url)
      .then((r) => r.blob())
      .then((blob) => {
        if (gone) return;
        objectUrl = URL.createObjectURL(blob);
        setSrc(objectUrl);
      })
      .catch(() => setSrc(""));
    return () => {
      gone = true;
      if (objectUrl) URL.revokeObjectURL(objectUrl);
    };
  }, [url, keyed]);
  return src;
}

export function ErrorBox({ error }) {
  if (!error) return null;
  return html`<div class="error" role="alert">
    <strong>${error.code || "error"}</strong>: <span class="error-message">${error.message}</span>
    ${error.field &&
    html`<div class="error-field">Field: <code>${error.field}</code>${error.value !== undefined &&
      html` (value <code>${JSON.stringify(error.value)}</code>)`}</div>`}
  </div>`;
}

export function KeyField({ onSaved }) {
  const [value, setValue] = useState(apiKey());
  const save = (e) => {
    e.preventDefault();
    setApiKey(value.trim());
    if (onSaved) onSaved();
  };
  return html`<form class="key" onSubmit=${save}>
    <label>API key <input type="password" name="api_key" autocomplete="off" value=${value}
      onInput=${(e) => setValue(e.target.value)} placeholder="the secret of an API key (kept in this browser)" /></label>
    <button type="submit">Save key</button>
  </form>`;
}

export function Nav({ page }) {
  const link = (href, name, label) =>
    html`<a href=${href} aria-current=${page === name ? "page" : undefined}>${label}</a>`;
  return html`<header class="nav">
    <span class="brand">Stipple</span>
    ${link("/", "generator", "Generate")} ${link("/network", "network", "Network")}
    <a href="/docs">API</a>
  </header>`;
}

export function mount(Component) {
  const root = document.getElementById("app");
  root.textContent = "";
  render(html`<${Component} />`, root);
}

export function shortId(id) {
  return id && id.length > 14 ? `${id.slice(0, 8)}…${id.slice(-4)}` : id || "";
}

export function ago(epochSeconds) {
  if (!epochSeconds) return "";
  const s = Math.max(0, Date.now() / 1000 - epochSeconds);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(epochSeconds * 1000).toLocaleString();
}

/** Poll `load` every `everyMs` while the page is open; returns [data, error, reload]. */
export function usePoll(load, everyMs, deps = []) {
  const [data, setData] = useState(null);
  const [error, setError] = useState(null);
  const [tick, setTick] = useState(0);
  useEffect(() => {
    let stopped = false;
    let timer = 0;
    const run = async () => {
      try {
        const value = await load();
        if (!stopped) {
          setData(value);
          setError(null);
        }
      } catch (e) {
        if (!stopped) setError(e);
      }
      if (!stopped) timer = setTimeout(run, everyMs);
    };
    run();
    return () => {
      stopped = true;
      clearTimeout(timer);
    };
  }, [...deps, tick]);
  return [data, error, () => setTick((t) => t + 1)];
}

export function Verdict({ verdict }) {
  return html`<span class=${`verdict verdict-${verdict}`}>${verdict}</span>`;
}

export function State({ state }) {
  return html`<span class=${`state state-${state}`}>${state}</span>`;
}
