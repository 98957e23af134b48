// "Copy as": the exact request on screen as curl, Python (openai SDK) and Node (openai SDK).
// Input files are named as the browser saw them (run the snippet where those files are); a painted
// mask is named mask.png (the page offers it for download).

import { formEntries } from "./api.js";

// The openai SDKs' named arguments; every other field goes in the body as is (Python: extra_body).
const SDK_PARAMS = {
  edits: new Set(["prompt", "model", "n", "size", "response_format", "output_format", "output_compression",
    "quality", "background", "input_fidelity", "partial_images", "stream", "user"]),
  generations: new Set(["prompt", "model", "n", "size", "response_format", "output_format", "output_compression",
    "quality", "background", "moderation", "partial_images", "stream", "style", "user"]),
};

function shellQuote(value) {
  return `'${String(value).replace(/'/g, `'"'"'`)}'`;
}

function fileNames(request) {
  return {
    images: request.images.map((image, i) => image.name || `image${i + 1}.png`),
    mask: request.mask ? request.mask.name || "mask.png" : null,
  };
}

export function curlSnippet(request, { base, route, hasKey }) {
  const lines = [`curl -s ${shellQuote(`${base}/v1/images/${request.endpoint}`)}`];
  if (hasKey) lines.push(`-H "Authorization: Bearer $IMAGEGATE_API_KEY"`);
  if (route !== null && route !== undefined) lines.push(`-H ${shellQuote(`x-imagegate-route: ${route}`)}`);
  if (request.endpoint === "edits") {
    for (const [name, value] of formEntries(request.fields)) {
      // -F would read a value starting with @ or < as a file: --form-string sends it verbatim.
      lines.push(`--form-string ${shellQuote(`${name}=${value}`)}`);
    }
    const files = fileNames(request);
    for (const name of files.images) lines.push(`-F ${shellQuote(`image[]=@${name}`)}`);
    if (files.mask) lines.push(`-F ${shellQuote(`mask=@${files.mask}`)}`);
  } else {
    lines.push(`-H 'Content-Type: application/json'`);
    lines.push(`-d ${shellQuote(JSON.stringify(request.fields))}`);
  }
  return lines.join(" \\\n  ");
}

function pyValue(value) {
  if (value === null) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (Array.isArray(value)) return `[${value.map(pyValue).join(", ")}]`;
  if (typeof value === "object") {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${pyValue(v)}`).join(", ")}}`;
  }
  return JSON.stringify(value);
}

function splitFields(request) {
  const named = {};
  const extra = {};
  for (const [key, value] of Object.entries(request.fields)) {
    (SDK_PARAMS[request.endpoint].has(key) ? named : extra)[key] = value;
  }
  return { named, extra };
}

export function pythonSnippet(request, { base, route, hasKey }) {
  const { named, extra } = splitFields(request);
  const key = hasKey ? `os.environ["IMAGEGATE_API_KEY"]` : `"unused"`;
  const out = ["# pip install openai", "import base64"];
  if (hasKey) out.push("import os");
  out.push("", "from openai import OpenAI", "", `client = OpenAI(base_url=${JSON.stringify(`${base}/v1`)}, api_key=${key})`);
  const args = [];
  if (request.endpoint === "edits") {
    const files = fileNames(request);
    args.push(`image=[${files.images.map((n) => `open(${JSON.stringify(n)}, "rb")`).join(", ")}]`);
    if (files.mask) args.push(`mask=open(${JSON.stringify(files.mask)}, "rb")`);
  }
  for (const [k, v] of Object.entries(named)) args.push(`${k}=${pyValue(v)}`);
  if (Object.keys(extra).length) args.push(`extra_body=${pyValue(extra)}`);
  if (route !== null && route !== undefined) args.push(`extra_headers={"x-imagegate-route": ${JSON.stringify(String(route))}}`);
  const call = request.endpoint === "edits" ? "client.images.edit" : "client.images.generate";
  out.push(`result = ${call}(`, ...args.map((a) => `    ${a},`), ")");
  out.push(
    "for i, image in enumerate(result.data, 1):",
    "    if image.b64_json:",
    "        path = f\"imagegate-{i}.{result.output_format or 'png'}\"",
    "        with open(path, \"wb\") as out:",
    "            out.write(base64.b64decode(image.b64_json))",
    "        print(path)",
    "    else:",
    "        print(image.url)",
  );
  return out.join("\n");
}

export function nodeSnippet(request, { base, route, hasKey }) {
  const out = ["// npm install openai; save as imagegate.mjs; node imagegate.mjs"];
  out.push(`import fs from "node:fs";`, `import OpenAI from "openai";`, "");
  const key = hasKey ? "process.env.IMAGEGATE_API_KEY" : `"unused"`;
  out.push(`const client = new OpenAI({ baseURL: ${JSON.stringify(`${base}/v1`)}, apiKey: ${key} });`);
  const props = [];
  if (request.endpoint === "edits") {
    const files = fileNames(request);
    props.push(`image: [${files.images.map((n) => `fs.createReadStream(${JSON.stringify(n)})`).join(", ")}]`);
    if (files.mask) props.push(`mask: fs.createReadStream(${JSON.stringify(files.mask)})`);
  }
  for (const [k, v] of Object.entries(request.fields)) props.push(`${k}: ${JSON.stringify(v)}`);
  const call = request.endpoint === "edits" ? "client.images.edit" : "client.images.generate";
  const options = route !== null && route !== undefined
    ? `, { headers: { "x-imagegate-route": ${JSON.stringify(String(route))} } }` : "";
  out.push(`const result = await ${call}({`, ...props.map((p) => `  ${p},`), `}${options});`);
  out.push(
    "result.data.forEach((image, i) => {",
    "  if (!image.b64_json) return console.log(image.url);",
    "  const path = `imagegate-${i + 1}.${result.output_format ?? \"png\"}`;",
    "  fs.writeFileSync(path, Buffer.from(image.b64_json, \"base64\"));",
    "  console.log(path);",
    "});",
  );
  return out.join("\n");
}

export const SNIPPETS = { curl: curlSnippet, python: pythonSnippet, node: nodeSnippet };
