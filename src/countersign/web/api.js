// The public API as the page uses it: JSON calls by the login cookie (unsafe methods send the
// CSRF token read from the countersign_csrf cookie) and Server-Sent Events read with fetch, so
// that a resumed stream can send Last-Event-ID itself.

export const API = "/api/v1";

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `the server answered ${status}`);
    this.status = status;
    this.code = body?.error?.code || null;
    this.detail = body?.error?.detail ?? null;
  }
}

const listeners = { unauthenticated: [] };

/** Call ``fn`` whenever the server says the login is gone (401). */
export function onUnauthenticated(fn) {
  listeners.unauthenticated.push(fn);
}

function unauthenticated() {
  for (const fn of listeners.unauthenticated) fn();
}

export function csrfToken() {
  const found = document.cookie.match(/(?:^|;\s*)countersign_csrf=([^;]*)/);
  return found ? decodeURIComponent(found[1]) : null;
}

function headersFor(method, extra = {}) {
  const headers = { Accept: "application/json", ...extra };
  if (!["GET", "HEAD"].includes(method)) {
    const token = csrfToken();
    if (token) headers["X-CSRF-Token"] = token;
  }
  return headers;
}

/** One JSON call; ApiError unless it succeeds. */
export async function api(method, path, body, { headers = {}, quiet401 = false } = {}) {
  const init = { method, headers: headersFor(method, headers), credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(API + path, init);
  if (response.status === 204) return null;
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    if (response.status === 401 && !quiet401) unauthenticated();
    throw new ApiError(response.status, data);
  }
  return data;
}

/**
 * Read an SSE response: yields {event, id, data} until the server ends the stream.
 * ``onOpen(response)`` is called once the headers are in (e.g. to read Location).
 */
export async function* readEvents(path, { method = "GET", body, headers: extra = {}, lastEventId, signal, onOpen } = {}) {
  const headers = headersFor(method, { Accept: "text/event-stream", ...extra });
  if (lastEventId) headers["Last-Event-ID"] = String(lastEventId);
  const init = { method, headers, signal, credentials: "same-origin" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(API + path, init);
  if (!response.ok) {
    const data = await response.json().catch(() => null);
    if (response.status === 401) unauthenticated();
    throw new ApiError(response.status, data);
  }
  if (onOpen) onOpen(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer = (buffer + value).replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const parsed = parseBlock(block);
        if (parsed) yield parsed;
      }
    }
  } finally {
    // A reader that stops early (a newer stream took over) closes the connection.
    reader.cancel().catch(() => {});
  }
}

function parseBlock(block) {
  let event = "message";
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // a comment: the server's heartbeat
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "id") id = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  return { event, id: id === null ? null : Number(id), data: JSON.parse(data.join("\n")) };
}

/** A fresh key for a request that must not happen twice (Idempotency-Key). */
export function newKey() {
  return crypto.randomUUID();
}
