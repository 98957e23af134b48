// The form <-> an OpenAI images request: {endpoint, fields, images, mask}. Empty controls are not
// sent, nor n=1; "Extra fields" (a JSON object) are merged into the fields as they are.

const $ = (id) => document.getElementById(id);
export const TEXT_FIELDS = ["size", "aspect_ratio", "resolution", "output_format", "negative_prompt", "response_format"];
export const NUMBER_FIELDS = ["n", "output_compression", "seed"];

export class FormProblem extends Error {
  constructor(param, message) {
    super(message);
    this.param = param;
  }
}

function numberValue(raw) {
  const text = raw.trim();
  if (!/^-?\d+$/.test(text)) return Number.isFinite(Number(text)) ? Number(text) : text; // the gateway says what is wrong
  const value = Number(text);
  return Number.isSafeInteger(value) ? value : text; // a 64-bit seed stays exact as a string
}

// {endpoint, fields, images, mask}; throws FormProblem for what the page itself can tell.
export function readForm(images, mask) {
  const model = $("model").value;
  const fields = { model, prompt: $("prompt").value };
  for (const name of TEXT_FIELDS) {
    const value = $(name).value.trim();
    if (value) fields[name] = value;
  }
  for (const name of NUMBER_FIELDS) {
    const value = $(name).value.trim();
    if (value && !(name === "n" && value === "1")) fields[name] = numberValue(value);
  }
  const extraText = $("extra").value.trim();
  if (extraText) {
    let extra;
    try {
      extra = JSON.parse(extraText);
    } catch (error) {
      throw new FormProblem("extra", `Extra fields are not valid JSON: ${error.message}`);
    }
    if (!extra || typeof extra !== "object" || Array.isArray(extra)) {
      throw new FormProblem("extra", "Extra fields must be a JSON object, e.g. {\"num_inference_steps\": 30}.");
    }
    Object.assign(fields, extra);
  }
  const endpoint = images.length ? "edits" : "generations";
  return { endpoint, fields, images: [...images], mask: endpoint === "edits" ? mask : null };
}

export function writeForm(fields) {
  $("prompt").value = fields.prompt || "";
  for (const name of [...TEXT_FIELDS, ...NUMBER_FIELDS]) $(name).value = fields[name] ?? (name === "n" ? "1" : "");
  if (!fields.response_format) $("response_format").value = "b64_json";
  const known = new Set(["model", "prompt", ...TEXT_FIELDS, ...NUMBER_FIELDS]);
  const extra = Object.fromEntries(Object.entries(fields).filter(([k]) => !known.has(k)));
  $("extra").value = Object.keys(extra).length ? JSON.stringify(extra) : "";
  if (fields.model && [...$("model").options].some((o) => o.value === fields.model)) $("model").value = fields.model;
}
