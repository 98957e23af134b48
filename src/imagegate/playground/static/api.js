// The gateway's public API, as the page uses it: models, edits (multipart), generations (JSON),
// dry runs, route pins, and the API key (session storage only).

const KEY_STORE = "imagegate.apiKey";

// Where the API lives: the page is served at "/" or "/playground" of the gateway, maybe under a prefix.
export const apiBase = new URL(".", document.baseURI).href.replace(/\/$/, "");

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(value) {
  if (value) sessionStorage.setItem(KEY_STORE, value);
  else sessionStorage.removeItem(KEY_STORE);
}

export function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// One HTTP exchange: {status, ok, headers, json, ms}. Never throws for HTTP errors; network errors and
// aborts are thrown as they come.
async function exchange(path, init) {
  const started = performance.now();
  const response = await fetch(`${apiBase}/${path}`, init);
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = { error: { message: text.slice(0, 500) || response.statusText, type: "http_error", param: null } };
  }
  return { status: response.status, ok: response.ok, headers: response.headers, json, ms: performance.now() - started };
}

export function listModels(signal) {
  return exchange("v1/models", { headers: authHeaders(), signal });
}

// `request` is {endpoint: "edits" | "generations", fields: {...}, images: [File], mask: Blob | null};
// `options` is {dryRun, route, signal}.
export function sendImageRequest(request, { dryRun = false, route = null, signal } = {}) {
  const headers = authHeaders();
  if (dryRun) headers["x-imagegate-dry-run"] = "1";
  if (route !== null && route !== undefined) headers["x-imagegate-route"] = String(route);
  let body;
  if (request.endpoint === "edits") {
    body = new FormData();
    for (const [name, value] of formEntries(request.fields)) body.append(name, value);
    for (const image of request.images) body.append("image[]", image, image.name || "image.png");
    if (request.mask) body.append("mask", request.mask, request.mask.name || "mask.png");
  } else {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(request.fields);
  }
  return exchange(`v1/images/${request.endpoint}`, { method: "POST", headers, body, signal });
}

// Multipart fields the way the OpenAI SDKs write them: objects as `key[sub]`, arrays as `key[]`.
export function formEntries(fields, prefix = "") {
  const out = [];
  for (const [key, value] of Object.entries(fields)) {
    const name = prefix ? `${prefix}[${key}]` : key;
    if (value === null || value === undefined) continue;
    if (Array.isArray(value)) {
      for (const item of value) {
        if (item !== null && typeof item === "object") out.push(...formEntries(item, `${name}[]`));
        else out.push([`${name}[]`, String(item)]);
      }
    } else if (typeof value === "object") {
      out.push(...formEntries(value, name));
    } else {
      out.push([name, String(value)]);
    }
  }
  return out;
}

// `x-imagegate-params: size=converted; n=emulated` -> [["size", "converted"], ["n", "emulated"]]
export function parseParamsHeader(value) {
  if (!value) return [];
  return value
    .split(";")
    .map((part) => part.trim())
    .filter(Boolean)
    .map((part) => {
      const at = part.indexOf("=");
      return at < 0 ? [part, ""] : [part.slice(0, at), part.slice(at + 1)];
    });
}

// OpenAI's error envelope -> {message, type, param, code}, whatever the body was.
export function errorOf(result) {
  const error = result.json && result.json.error;
  if (error && typeof error === "object") {
    return { message: String(error.message || "Request failed"), type: error.type, param: error.param, code: error.code };
  }
  return { message: `HTTP ${result.status}`, type: "http_error", param: null, code: null };
}
