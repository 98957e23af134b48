// Rendering: result galleries, the parameter report, dry-run payloads, compare columns.

import { authHeaders, errorOf, parseParamsHeader } from "./api.js";

const MODE_MEANING = {
  passthrough: "sent to the provider unchanged",
  renamed: "sent under the provider's name for it",
  converted: "translated into the provider's form",
  emulated: "done by the gateway (the provider cannot)",
  ignored: "not sent: it has no effect on this route",
  rejected: "refused with a 400",
};

let objectUrls = [];

export function releaseImages() {
  for (const url of objectUrls) URL.revokeObjectURL(url);
  objectUrls = [];
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

export function formatBytes(count) {
  if (count === null || count === undefined) return "? bytes";
  if (count < 1024) return `${count} B`;
  if (count < 1024 * 1024) return `${(count / 1024).toFixed(1)} kB`;
  return `${(count / 1024 / 1024).toFixed(2)} MB`;
}

export function formatMs(ms) {
  return `${(ms / 1000).toFixed(2)} s`;
}

function base64ToBlob(b64, type) {
  const raw = atob(b64);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return new Blob([bytes], { type });
}

async function imageBlob(item, format) {
  if (item.b64_json) return base64ToBlob(item.b64_json, `image/${format}`);
  try {
    const sameOrigin = new URL(item.url, location.href).origin === location.origin;
    const response = await fetch(item.url, { headers: sameOrigin ? authHeaders() : {} });
    if (response.ok) return await response.blob();
  } catch {
    // a provider URL on another origin: shown directly, bytes unknown
  }
  return null;
}

// One figure per output image; resolves to [{width, height, bytes}] once every image is decoded.
export async function renderGallery(container, result, { ms, label = "" }) {
  const body = result.json || {};
  const format = body.output_format || "png";
  const figures = await Promise.all(
    (body.data || []).map(async (item, index) => {
      const blob = await imageBlob(item, format);
      const src = blob ? URL.createObjectURL(blob) : item.url;
      if (blob) objectUrls.push(src);
      const img = el("img", { src, alt: `Result ${index + 1}${label ? ` of ${label}` : ""}`, class: "result-image" });
      try {
        await img.decode();
      } catch {
        // shown broken; the caption says so
      }
      const info = { width: img.naturalWidth, height: img.naturalHeight, bytes: blob ? blob.size : null };
      img.dataset.width = info.width;
      img.dataset.height = info.height;
      const caption = el(
        "figcaption",
        {},
        el("span", { class: "meta", text: `${info.width}×${info.height} · ${format} · ${formatBytes(info.bytes)} · ${formatMs(ms)}` }),
        " ",
        el("a", { href: src, download: `imagegate-${index + 1}.${format === "jpeg" ? "jpg" : format}`, text: "Download" }),
      );
      return { figure: el("figure", { class: "result" }, img, caption), info };
    }),
  );
  container.replaceChildren(...figures.map((f) => f.figure));
  return figures.map((f) => f.info);
}

// The x-imagegate-params report (and a dry run's notes, when there is one) as table rows.
export function renderParams(tbody, headerValue, notes = {}) {
  const rows = parseParamsHeader(headerValue).map(([param, mode]) =>
    el(
      "tr",
      { "data-param": param },
      el("th", { scope: "row" }, el("code", { text: param })),
      el("td", {}, el("span", { class: `mode mode-${mode}`, text: mode })),
      el("td", { text: notes[param] || MODE_MEANING[mode] || "" }),
    ),
  );
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 3, text: "No parameter beyond the prompt and images." })));
  tbody.replaceChildren(...rows);
}

export function routeInfo(headers) {
  const parts = [];
  const provider = headers.get("x-imagegate-provider");
  if (provider) parts.push(`provider ${provider}`);
  const upstream = headers.get("x-imagegate-upstream-model");
  if (upstream) parts.push(`upstream model ${upstream}`);
  const upstreamId = headers.get("x-imagegate-upstream-request-id");
  if (upstreamId) parts.push(`upstream request ${upstreamId}`);
  const cost = headers.get("x-imagegate-cost-usd");
  if (cost) parts.push(`cost $${cost}`);
  const id = headers.get("x-request-id");
  if (id) parts.push(`request ${id}`);
  return parts.join(" · ");
}

// Long data URIs make a payload unreadable: show their start and length instead.
export function shortenDataUris(value) {
  return JSON.stringify(
    value,
    (_, v) => (typeof v === "string" && v.startsWith("data:") && v.length > 120 ? `${v.slice(0, 60)}… (${v.length} characters)` : v),
    2,
  );
}

// One compare column: its heading first, then a progress line, then the outcome.
export function compareColumn(grid, label) {
  const status = el("p", { class: "help", role: "status", text: "Running…" });
  const gallery = el("div", { class: "gallery" });
  const params = el("ul", { class: "param-list" });
  const column = el("section", { class: "compare-column", "aria-label": label }, el("h3", { text: label }), status, gallery, params);
  grid.append(column);
  return {
    async show(result) {
      column.dataset.status = String(result.status);
      if (!result.ok) {
        const error = errorOf(result);
        status.replaceChildren(el("strong", { class: "error-text", text: `${result.status} ` }), error.message);
        return;
      }
      const cost = result.headers.get("x-imagegate-cost-usd");
      const provider = result.headers.get("x-imagegate-provider") || "?";
      status.textContent = `${formatMs(result.ms)} · ${provider} · cost ${cost ? `$${cost}` : "n/a"}`;
      await renderGallery(gallery, result, { ms: result.ms, label });
      params.replaceChildren(
        ...parseParamsHeader(result.headers.get("x-imagegate-params")).map(([p, m]) =>
          el("li", {}, el("code", { text: p }), " ", el("span", { class: `mode mode-${m}`, text: m })),
        ),
      );
    },
    fail(message) {
      column.dataset.status = "error";
      status.textContent = message;
    },
  };
}
