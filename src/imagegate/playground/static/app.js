// The playground page: reads the form into an OpenAI images request, runs it (or a dry run, or a
// compare), and shows what came back. Only the gateway's public API is used (see api.js).

import { apiBase, apiKey, errorOf, listModels, sendImageRequest, setApiKey } from "./api.js";
import { FormProblem, readForm, writeForm } from "./form.js";
import { addHistory, clearHistory, dataUrlToFile, loadHistory } from "./history.js";
import { MaskPainter } from "./mask.js";
import {
  compareColumn, el, formatBytes, formatMs, releaseImages, renderGallery, renderParams, routeInfo, shortenDataUris,
} from "./render.js";
import { SNIPPETS } from "./snippets.js";

const $ = (id) => document.getElementById(id);
const form = $("request-form");
const SIZE_PRESETS = ["auto", "1024x1024", "1183x887", "887x1182", "1365x768", "768x1365", "512x512",
  "2048x2048", "1536x1024", "1024x1536"];
// Which control an error's `param` names (default: the control with that id).
const FIELD_OF = {
  image: "images", images: "images", "image[]": "images", mask: "mask-file", "x-imagegate-route": "compare-box",
};
const ERROR_OF = { images: "image-error", "mask-file": "mask-error", "compare-box": "x-imagegate-route-error" };
const state = { images: [], maskFile: null, snippet: "curl", inflight: null, sizeTouched: false };
const painter = new MaskPainter($("mask-canvas"), $("brush"));
const readRequest = () => readForm(state.images, state.maskFile);

// -- errors on fields ---------------------------------------------------------------------------

function clearErrors() {
  $("error").hidden = true;
  for (const node of form.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
  for (const node of form.querySelectorAll(".field-error")) {
    node.hidden = true;
    node.textContent = "";
  }
}

function showError(error, status) {
  const box = $("error");
  box.replaceChildren(
    el("strong", { text: `${status ? `${status} ` : ""}${error.type || "error"}${error.code ? ` · ${error.code}` : ""}` }),
    el("p", { text: error.message }),
    error.param ? el("p", { class: "help" }, "param: ", el("code", { text: error.param })) : null,
  );
  box.hidden = false;
  const param = error.param || "";
  let id = FIELD_OF[param] || param.replace(/\[.*$/, "");
  if (!id || !$(id) || !form.contains($(id))) id = param ? "extra" : "";
  const control = id && $(id);
  if (!control) return;
  if (id === "mask-file") $("mask-box").open = true;
  control.setAttribute("aria-invalid", "true");
  const message = $(ERROR_OF[id] || `${id}-error`);
  if (message) {
    message.textContent = error.message;
    message.hidden = false;
  }
  control.focus({ preventScroll: false });
}

function needKey() {
  $("key-row").hidden = false;
  $("status").textContent = "This gateway needs an API key: enter it above.";
  $("api-key").focus();
}

// -- running ------------------------------------------------------------------------------------

function startProgress(label) {
  const controller = new AbortController();
  const started = performance.now();
  $("progress").hidden = false;
  $("status").textContent = label;
  const timer = setInterval(() => { $("elapsed").textContent = formatMs(performance.now() - started); }, 100);
  for (const id of ["run", "show-payload", "compare"]) $(id).disabled = true;
  state.inflight = controller;
  return {
    signal: controller.signal,
    done() {
      clearInterval(timer);
      $("progress").hidden = true;
      for (const id of ["run", "show-payload", "compare"]) $(id).disabled = false;
      state.inflight = null;
    },
  };
}

// On a phone the results are below the form: bring them into view once there is something to see.
function revealResults() {
  if (window.matchMedia("(max-width: 820px)").matches) $("results").scrollIntoView({ block: "start" });
}

async function guarded(label, work) {
  clearErrors();
  let request;
  try {
    request = readRequest();
  } catch (problem) {
    if (problem instanceof FormProblem) return showError({ message: problem.message, param: problem.param, type: "invalid_request_error" });
    throw problem;
  }
  const progress = startProgress(label);
  try {
    await work(request, progress.signal);
  } catch (error) {
    $("status").textContent = error.name === "AbortError" ? "Cancelled." : `Failed: ${error.message}`;
  } finally {
    progress.done();
  }
}

function failed(result) {
  if (result.ok) return false;
  if (result.status === 401) needKey();
  const error = errorOf(result);
  showError(error, result.status);
  $("status").textContent = `Failed after ${formatMs(result.ms)}: ${error.message}`;
  return true;
}

async function run() {
  await guarded("Running…", async (request, signal) => {
    const result = await sendImageRequest(request, { signal });
    $("payload-box").hidden = true;
    $("compare-grid").hidden = true;
    const outcome = result.ok ? `${result.status} in ${formatMs(result.ms)}` : `${result.status} ${errorOf(result).code || ""}`;
    await addHistory(request, { outcome }).then(renderHistory);
    releaseImages();
    $("gallery").replaceChildren();
    $("report").hidden = true;
    if (failed(result)) return;
    const infos = await renderGallery($("gallery"), result, { ms: result.ms });
    renderParams($("params-table").tBodies[0], result.headers.get("x-imagegate-params"));
    $("route-info").textContent = routeInfo(result.headers);
    $("report").hidden = false;
    const total = infos.reduce((sum, i) => sum + (i.bytes || 0), 0);
    $("status").textContent = `${infos.length} image(s), ${formatBytes(total)}, in ${formatMs(result.ms)}.`;
    revealResults();
  });
}

async function showPayload() {
  await guarded("Dry run…", async (request, signal) => {
    const result = await sendImageRequest(request, { dryRun: true, signal });
    if (failed(result)) return;
    const body = result.json;
    $("payload").textContent = shortenDataUris(body.payloads);
    const called = result.headers.get("x-imagegate-upstream-request-id");
    $("payload-note").textContent = `${body.object}: ${called ? "the provider was called" : `nothing was sent to ${body.provider}`}`
      + ` (upstream model ${body.upstream_model}${body.target_size ? `, output size ${body.target_size}` : ""}).`;
    $("payload-box").hidden = false;
    renderParams($("params-table").tBodies[0], result.headers.get("x-imagegate-params"), body.notes || {});
    $("route-info").textContent = routeInfo(result.headers);
    $("report").hidden = false;
    $("status").textContent = `Dry run in ${formatMs(result.ms)}: no provider call.`;
    revealResults();
  });
}

async function compare() {
  const models = [...document.querySelectorAll("#compare-models input:checked")].map((box) => box.value);
  if (!models.length) models.push($("model").value);
  await guarded("Comparing…", async (base, signal) => {
    if (base.fields.seed === undefined) base.fields.seed = Math.floor(Math.random() * 2 ** 31); // same seed everywhere
    const targets = [];
    for (const model of models) {
      const request = { ...base, fields: { ...base.fields, model } };
      if (!$("compare-routes").checked) {
        targets.push({ request, route: null, label: model });
        continue;
      }
      const dry = await sendImageRequest(request, { dryRun: true, signal });
      if (dry.status === 401) return failed(dry);
      if (!dry.ok) {
        targets.push({ request, route: null, label: model, outcome: dry }); // the column shows why
        continue;
      }
      dry.json.routes.forEach((r, i) => targets.push({ request, route: i, label: `${model} · route ${i}: ${r.provider}:${r.upstream_model}` }));
    }
    const grid = $("compare-grid");
    releaseImages();
    $("report").hidden = true;
    $("payload-box").hidden = true;
    grid.replaceChildren();
    grid.hidden = false;
    $("gallery").replaceChildren();
    $("status").textContent = `Comparing ${targets.length} columns, seed ${base.fields.seed}…`;
    revealResults();
    await Promise.all(targets.map(async ({ request, route, label, outcome }) => {
      const column = compareColumn(grid, label);
      try {
        await column.show(outcome || await sendImageRequest(request, { route, signal }));
      } catch (error) {
        column.fail(error.name === "AbortError" ? "Cancelled." : error.message);
      }
    }));
    $("status").textContent = `Compared ${targets.length} columns with seed ${base.fields.seed}.`;
    updateSnippet();
  });
}

// -- snippets -----------------------------------------------------------------------------------

function updateSnippet() {
  let text;
  try {
    text = SNIPPETS[state.snippet](readRequest(), { base: apiBase, route: null, hasKey: Boolean(apiKey()) });
  } catch (problem) {
    text = `# ${problem.message}`;
  }
  $("snippet").textContent = text;
}

function selectTab(name, focus = false) {
  state.snippet = name;
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const selected = tab.id === `tab-${name}`;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    if (selected && focus) tab.focus();
  }
  updateSnippet();
}

// -- images, mask, models, history --------------------------------------------------------------

async function setImages(files) {
  state.images = files.filter((f) => f.type.startsWith("image/") || /\.(png|jpe?g|webp|gif|avif|bmp)$/i.test(f.name));
  const items = await Promise.all(state.images.map(async (file, index) => {
    const url = URL.createObjectURL(file);
    const img = el("img", { src: url, alt: file.name });
    try { await img.decode(); } catch { /* not decodable here; the gateway will say */ }
    const remove = el("button", { type: "button", "aria-label": `Remove ${file.name}`, text: "×" });
    remove.addEventListener("click", () => setImages(state.images.filter((_, i) => i !== index)));
    return el("li", {}, img, el("span", { text: `${file.name} · ${img.naturalWidth}×${img.naturalHeight} · ${formatBytes(file.size)}` }), remove);
  }));
  $("previews").replaceChildren(...items);
  if (!state.images.length) painter.close();
  updateSnippet();
}

async function loadModels() {
  const result = await listModels();
  if (result.status === 401) return needKey();
  if (failed(result)) return;
  const ids = result.json.data.map((m) => m.id).sort();
  // The model in use, else the last one used here, else the offline sandbox (it always works).
  const preferred = [$("model").value, localStorage.getItem("imagegate.playground.model"), "sandbox-edit"];
  $("model").replaceChildren(...ids.map((id) => el("option", { value: id, text: id })));
  const pick = preferred.find((id) => ids.includes(id));
  if (pick) $("model").value = pick;
  $("compare-models").replaceChildren(...ids.map((id) =>
    el("label", { class: "check" }, el("input", { type: "checkbox", value: id }), ` ${id}`)));
  updateSnippet();
}

function renderHistory() {
  const items = loadHistory().map((entry) => {
    const rerun = el("button", { type: "button", text: "Re-run" });
    rerun.addEventListener("click", () => restore(entry, true));
    const load = el("button", { type: "button", text: "Load" });
    load.addEventListener("click", () => restore(entry, false));
    const when = new Date(entry.at).toLocaleTimeString();
    const images = entry.images.length ? ` · ${entry.images.length} image(s)` : "";
    return el("li", {}, el("span", { text: `${when} · ${entry.fields.model} · “${(entry.fields.prompt || "").slice(0, 60)}”${images} · ${entry.outcome}` }), " ", load, " ", rerun);
  });
  $("history").replaceChildren(...items);
}

async function restore(entry, andRun) {
  writeForm(entry.fields);
  const missing = entry.images.some((i) => !i.data);
  if (!missing) {
    await setImages(entry.images.map((i) => dataUrlToFile(i.data, i.name)));
    state.maskFile = entry.mask && entry.mask.data ? dataUrlToFile(entry.mask.data, entry.mask.name) : null;
    $("mask-clear").disabled = !state.maskFile;
  } else {
    $("status").textContent = "The input images of that request were too large to keep: choose them again.";
  }
  updateSnippet();
  if (andRun && !missing) await run();
}

function wire() {
  $("size-presets").replaceChildren(...SIZE_PRESETS.map((s) => el("option", { value: s })));
  form.addEventListener("submit", (event) => { event.preventDefault(); run(); });
  form.addEventListener("input", () => updateSnippet());
  form.addEventListener("change", () => updateSnippet());
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) form.requestSubmit(); });
  $("show-payload").addEventListener("click", showPayload);
  $("compare").addEventListener("click", compare);
  $("cancel").addEventListener("click", () => state.inflight && state.inflight.abort());
  $("images").addEventListener("change", (e) => setImages([...e.target.files]));
  document.addEventListener("paste", (e) => {
    const pasted = [...e.clipboardData.files].filter((f) => f.type.startsWith("image/"));
    if (pasted.length) setImages([...state.images, ...pasted]);
  });
  // `size` wins over aspect_ratio + resolution: choosing one of them empties a size still at its default.
  $("size").addEventListener("input", () => { state.sizeTouched = true; });
  for (const id of ["aspect_ratio", "resolution"]) {
    $(id).addEventListener("change", () => {
      if ($(id).value && !state.sizeTouched && $("size").value === $("size").defaultValue) {
        $("size").value = "";
        $("status").textContent = "size emptied: aspect_ratio + resolution apply only without it.";
      }
    });
  }
  const zone = $("dropzone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); setImages([...e.dataTransfer.files]); });
  $("mask-file").addEventListener("change", (e) => {
    state.maskFile = e.target.files[0] || null;
    painter.close();
    $("mask-clear").disabled = !state.maskFile;
  });
  $("mask-paint").addEventListener("click", async () => {
    if (!state.images.length) { $("mask-status").textContent = "Choose an input image first."; return; }
    await painter.open(state.images[0]);
    $("mask-status").textContent = "Drag over the image: red = the area to edit.";
  });
  $("mask-canvas").addEventListener("maskchange", async () => {
    state.maskFile = await painter.toFile();
    $("mask-clear").disabled = !state.maskFile;
    $("mask-status").textContent = "Mask painted: it is sent as mask.png.";
    updateSnippet();
  });
  $("mask-clear").addEventListener("click", () => {
    state.maskFile = null;
    $("mask-file").value = "";
    painter.close();
    $("mask-clear").disabled = true;
    $("mask-status").textContent = "No mask.";
    updateSnippet();
  });
  $("model").addEventListener("change", () => localStorage.setItem("imagegate.playground.model", $("model").value));
  $("api-key").value = apiKey();
  const useKey = () => { setApiKey($("api-key").value.trim()); updateSnippet(); loadModels(); };
  $("api-key").addEventListener("change", useKey);
  $("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); useKey(); } });
  if (apiKey()) $("key-row").hidden = false;
  const tabs = ["curl", "python", "node"];
  for (const name of tabs) {
    const tab = $(`tab-${name}`);
    tab.addEventListener("click", () => selectTab(name));
    tab.addEventListener("keydown", (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (step) selectTab(tabs[(tabs.indexOf(name) + step + tabs.length) % tabs.length], true);
    });
  }
  $("copy").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText($("snippet").textContent);
      $("status").textContent = "Copied.";
    } catch {
      getSelection().selectAllChildren($("snippet"));
      $("status").textContent = "Selected: press Ctrl+C to copy.";
    }
  });
  $("history-clear").addEventListener("click", () => { clearHistory(); renderHistory(); });
}

wire();
renderHistory();
loadModels().catch((error) => { $("status").textContent = `Cannot reach the gateway: ${error.message}`; });
