// The session's requests in localStorage, newest first, re-runnable. Input images are kept with an
// entry while they are small (INLINE_LIMIT in total); larger ones are remembered by name only.

const STORE = "imagegate.playground.history";
const MAX_ENTRIES = 20;
const INLINE_LIMIT = 1_500_000; // characters of data URIs per entry

export function loadHistory() {
  try {
    const entries = JSON.parse(localStorage.getItem(STORE) || "[]");
    return Array.isArray(entries) ? entries : [];
  } catch {
    return [];
  }
}

function save(entries) {
  let kept = entries.slice(0, MAX_ENTRIES);
  while (kept.length) {
    try {
      localStorage.setItem(STORE, JSON.stringify(kept));
      return;
    } catch {
      kept = kept.slice(0, -1); // over the quota: drop the oldest and try again
    }
  }
  localStorage.removeItem(STORE);
}

export function clearHistory() {
  localStorage.removeItem(STORE);
}

function fileToDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

export function dataUrlToFile(dataUrl, name) {
  const [head, b64] = dataUrl.split(",", 2);
  const type = (head.match(/^data:([^;,]+)/) || [])[1] || "application/octet-stream";
  const raw = atob(b64 || "");
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return new File([bytes], name, { type });
}

// `request` as api.sendImageRequest takes it; `outcome` is a one-line summary.
export async function addHistory(request, { route = null, outcome }) {
  const files = [...request.images, ...(request.mask ? [request.mask] : [])];
  const total = files.reduce((sum, f) => sum + f.size, 0) * 1.37;
  const inline = total <= INLINE_LIMIT;
  const pack = async (file) => ({ name: file.name, data: inline ? await fileToDataUrl(file) : null });
  const entry = {
    id: `${Date.now()}-${Math.random().toString(36).slice(2, 8)}`,
    at: new Date().toISOString(),
    endpoint: request.endpoint,
    fields: request.fields,
    route,
    images: await Promise.all(request.images.map(pack)),
    mask: request.mask ? await pack(request.mask) : null,
    outcome,
  };
  save([entry, ...loadHistory()]);
  return entry;
}
