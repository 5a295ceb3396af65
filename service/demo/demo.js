// cnnserve demo: the public HTTP API only (GET /models, GET /models/{name}/samples, POST /classify,
// POST /classify/explain). Paths are relative to this page, so it works behind a path prefix.
"use strict";
const api = (path) => new URL("../" + path, document.baseURI).toString();
const $ = (id) => document.getElementById(id);
let models = [];

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function reason(response) {
  try { const body = await response.json(); return body.error || response.statusText; }
  catch (e) { return response.statusText; }
}

async function loadModels() {
  const response = await fetch(api("models"));
  if (!response.ok) { status("cannot list models: " + await reason(response), true); return; }
  models = (await response.json()).models;
  const select = $("model");
  select.replaceChildren(...models.map((m) => new Option(`${m.name} (${m.arch}, ${m.precision})`, m.name)));
  select.addEventListener("change", modelChanged);
  await modelChanged();
}

async function modelChanged() {
  const m = models.find((x) => x.name === $("model").value);
  const [c, h, w] = m.input.shape.slice(1);
  $("model-info").textContent = `input ${c}x${h}x${w}, ${m.labels.length} classes, on ${m.providers[0]}`;
  const box = $("samples");
  box.replaceChildren();
  const response = await fetch(api(`models/${encodeURIComponent(m.name)}/samples`));
  if (!response.ok) return;
  for (const s of (await response.json()).samples) {
    const button = document.createElement("button");
    button.type = "button";
    button.title = `sample: ${s.label}`;
    button.dataset.label = s.label;
    const img = document.createElement("img");
    img.src = s.image;
    img.alt = s.label;
    button.append(img);
    button.addEventListener("click", async () => classify(await (await fetch(s.image)).blob()));
    box.append(button);
  }
}

function drawBars(predictions) {
  $("bars").replaceChildren(...predictions.map((p) => {
    const li = document.createElement("li");
    li.className = "bar";
    li.dataset.label = p.label;
    li.dataset.index = p.index;
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = p.label;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = `${(100 * p.probability).toFixed(1)}%`;
    track.append(fill);
    const prob = document.createElement("span");
    prob.className = "p";
    prob.textContent = p.probability.toFixed(3);
    li.append(name, track, prob);
    return li;
  }));
}

async function classify(blob) {
  const model = $("model").value;
  const type = blob.type && blob.type.startsWith("image/") ? blob.type : "application/octet-stream";
  $("input").src = URL.createObjectURL(blob);
  $("bars").replaceChildren();
  $("heatmap").removeAttribute("src");
  $("heatmap").dataset.drawn = "false";
  status("classifying ...");
  const query = `model=${encodeURIComponent(model)}`;
  const response = await fetch(api(`classify?${query}&top_k=5`), {method: "POST", body: blob, headers: {"Content-Type": type}});
  if (!response.ok) { status(`the service refused the image: ${await reason(response)}`, true); return; }
  const answer = await response.json();
  drawBars(answer.predictions);
  status(`top class: ${answer.predictions[0].label}; computing the occlusion map ...`);
  const t0 = performance.now();
  const map = await fetch(api(`classify/explain?${query}&format=png`), {method: "POST", body: blob, headers: {"Content-Type": type}});
  if (!map.ok) { status(`no occlusion map: ${await reason(map)}`, true); return; }
  const heatmap = $("heatmap");
  heatmap.onload = () => { heatmap.dataset.drawn = "true"; };
  heatmap.src = URL.createObjectURL(await map.blob());
  $("heatmap-caption").textContent = `occlusion map for "${answer.predictions[0].label}" ` +
    `(p = ${Number(map.headers.get("X-Probability")).toFixed(3)}, ${Math.round(performance.now() - t0)} ms)`;
  status(`top class: ${answer.predictions[0].label}`);
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) classify(e.dataTransfer.files[0]);
});
$("file").addEventListener("change", (e) => { if (e.target.files.length) classify(e.target.files[0]); });
loadModels().catch((e) => status(`cannot reach the service: ${e}`, true));
