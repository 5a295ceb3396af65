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
  const listed = await response.json();
  models = listed.models;
  const loaded = listed.loaded || {};  // every loaded version, oldest to newest (models at runtime)
  const others = (m) => (loaded[m.name] || []).filter((v) => v !== m.version);
  const select = $("model");
  select.replaceChildren(...models.map((m) => new Option(
    `${m.name} ${m.version} (${m.arch}, ${m.precision}` +
    (others(m).length ? `; also loaded: ${others(m).join(", ")})` : ")"), m.name)));
  select.addEventListener("change", modelChanged);
  await modelChanged();
}

function currentModel() {
  return models.find((x) => x.name === $("model").value);
}

// Occluded copies /classify/explain makes by default, as service/explain.py counts them: a square of
// about a seventh of the shorter side, moved by half its side, plus one flush with each far edge.
function occlusions(h, w) {
  const patch = Math.max(2, Math.round(Math.min(h, w) / 7));
  const stride = Math.max(1, Math.floor(patch / 2));
  const positions = (size) => {
    let n = Math.floor((size - patch) / stride) + 1;
    if ((n - 1) * stride !== size - patch) n += 1;
    return n;
  };
  return positions(h) * positions(w);
}

// Milliseconds per image the model took last: from this page's last occlusion map of it, else from
// one /classify's Server-Timing "inference" (a batch of one: an upper estimate, batches run faster).
const msPerImage = {};

function inferenceMs(response) {
  const timing = response.headers.get("Server-Timing") || "";
  const match = timing.match(/(?:^|,)\s*inference;dur=([\d.]+)/);
  return match ? Number(match[1]) : null;
}

// Results belong to one image and one model: cleared before the next request, so nothing stale stays
// on screen when it fails.
function clearResults() {
  $("bars").replaceChildren();
  $("ood").hidden = true;
  $("input").removeAttribute("src");
  const heatmap = $("heatmap");
  heatmap.removeAttribute("src");
  heatmap.dataset.drawn = "false";
  $("heatmap-caption").textContent = "occlusion map";
}

async function modelChanged() {
  const m = currentModel();
  const [c, h, w] = m.input.shape.slice(1);
  clearResults();
  status("");
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

// The export fitted a threshold on the energy score's distance from the validation images' that 95% of them
// pass: an image over it is unlike the training data, and its probabilities say little (docs/serving.md).
function showOod(answer) {
  const note = $("ood");
  if (answer.in_distribution === false) {
    note.textContent = `This image is unlike the training data (out-of-distribution score ` +
      `${answer.ood_score.toFixed(2)} is over the model's threshold): treat these probabilities with suspicion.`;
    note.dataset.inDistribution = "false";
    note.hidden = false;
  } else if (answer.in_distribution === true) {
    note.textContent = `Like the training data (out-of-distribution score ${answer.ood_score.toFixed(2)}).`;
    note.dataset.inDistribution = "true";
    note.hidden = false;
  }
}

async function classify(blob) {
  const m = currentModel();
  const type = blob.type && blob.type.startsWith("image/") ? blob.type : "application/octet-stream";
  clearResults();
  $("input").src = URL.createObjectURL(blob);
  status("classifying ...");
  const query = `model=${encodeURIComponent(m.name)}`;
  // at most five classes, and never more than the model has (the API refuses a top_k beyond them)
  const topK = Math.min(5, m.labels.length);
  const response = await fetch(api(`classify?${query}&top_k=${topK}`), {method: "POST", body: blob, headers: {"Content-Type": type}});
  if (!response.ok) { status(`the service refused the image: ${await reason(response)}`, true); return; }
  const answer = await response.json();
  drawBars(answer.predictions);
  showOod(answer);
  const top = answer.predictions[0].label;
  const [, h, w] = m.input.shape.slice(1);
  const copies = occlusions(h, w);
  const perImage = msPerImage[m.name] ?? inferenceMs(response);
  const expected = perImage != null ? (copies + 1) * perImage / 1000 : null;
  const t0 = performance.now();
  const tick = () => {
    const spent = (performance.now() - t0) / 1000;
    status(`top class: ${top}; computing the occlusion map: ${copies} occluded copies of the ${h}x${w} input, ` +
           `${spent.toFixed(1)} s` + (expected != null ? ` of about ${Math.max(expected, 0.1).toFixed(1)} s` : ""));
  };
  tick();
  const timer = setInterval(tick, 200);
  let map;
  try {
    map = await fetch(api(`classify/explain?${query}&format=png`), {method: "POST", body: blob, headers: {"Content-Type": type}});
  } finally {
    clearInterval(timer);
  }
  if (!map.ok) { status(`no occlusion map: ${await reason(map)}`, true); return; }
  const spentMs = performance.now() - t0;
  msPerImage[m.name] = spentMs / (copies + 1);
  const heatmap = $("heatmap");
  heatmap.onload = () => { heatmap.dataset.drawn = "true"; };
  heatmap.src = URL.createObjectURL(await map.blob());
  $("heatmap-caption").textContent = `occlusion map for "${top}" ` +
    `(p = ${Number(map.headers.get("X-Probability")).toFixed(3)}, ${copies} occluded copies, ${Math.round(spentMs)} ms)`;
  status(`top class: ${top}`);
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
