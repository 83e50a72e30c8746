// The upload page: lists the loaded models (ui/models) and their operating points (the model
// metadata route), posts the chosen images to predict, and draws one card per image. Every URL is
// relative, so the page also works behind a proxy that serves the API under a path prefix.
"use strict";

const $ = (id) => document.getElementById(id);
let thresholds = [];  // the selected model's operating-point thresholds: the gauge's scale
let lastFiles = [];   // re-sent when a setting changes

class ServiceError extends Error {}

async function call(url, options = {}) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    // Every error answer of the service has the body {"error": "<message>", "code": ..., "file": ...}.
    const message = body && typeof body.error === "string" ? body.error : `HTTP ${response.status}`;
    throw new ServiceError(message);
  }
  return body;
}

function showError(error) {
  $("error").textContent = error instanceof ServiceError ? error.message : `request failed: ${error.message}`;
  $("error").hidden = false;
}

function option(value, text, selected) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = text;
  element.selected = selected;
  return element;
}

async function loadModels() {
  const listing = await call("ui/models");
  $("model").replaceChildren(...listing.models.map((ref) => option(ref, ref, ref === listing.default)));
  await loadOperatingPoints();
}

async function modelMetadata() {
  const [name, version] = $("model").value.split(":");
  return call(`v2/models/${encodeURIComponent(name)}/versions/${encodeURIComponent(version)}`);
}

// The model version's drift alarm (docs/drift.md), as the worker that answered sees it.
function showDrift(drift) {
  if (!drift) {
    $("drift").textContent = "Drift alarm: off";
    return;
  }
  const images = `${drift.images} image${drift.images === 1 ? "" : "s"} since the last reset`;
  const level = `log10 martingale ${drift.log10_martingale.toFixed(2)}, alarm at ${drift.alarm_log10_level.toFixed(2)}`;
  $("drift").textContent = drift.alarm
    ? `Drift alarm: RAISED, the inputs no longer look like the calibration images (${level}; ${images})`
    : `Drift alarm: quiet (${level}; ${images})`;
}

async function loadOperatingPoints() {
  const metadata = await modelMetadata();
  showDrift(metadata.drift);
  const parameters = metadata.parameters;
  thresholds = parameters.operating_points.map((point) => point.threshold);
  $("operating-point").replaceChildren(...parameters.operating_points.map((point) => option(
    point.target_id_acceptance,
    `${percent(point.target_id_acceptance)} ID accepted (threshold ${point.threshold.toPrecision(4)})`,
    point.target_id_acceptance === parameters.default_operating_point,
  )));
  const classes = parameters.class_names.length;
  $("top-k").max = classes;
  $("top-k").value = Math.min(5, classes);
}

function percent(share) {
  return `${Number((100 * share).toFixed(1))}%`;  // 95%, 99.5%
}

async function classify(files) {
  lastFiles = files;
  $("error").hidden = true;
  if (!files.length) return;
  const form = new FormData();
  files.forEach((file) => form.append("files", file, file.name));
  const settings = { model: $("model").value, operating_point: $("operating-point").value, top_k: $("top-k").value };
  const query = new URLSearchParams(Object.entries(settings).filter(([, value]) => value !== ""));
  const key = $("api-key").value.trim();
  $("status").textContent = `Classifying ${files.length} image${files.length === 1 ? "" : "s"}…`;
  try {
    const answer = await call(`predict?${query}`, {
      method: "POST", body: form, headers: key ? { "X-API-Key": key } : {},
    });
    const scale = gaugeScale(answer.predictions);
    $("results").replaceChildren(...answer.predictions.map((p, i) => card(p, files[i], scale)));
    $("status").textContent = `${files.length} image${files.length === 1 ? "" : "s"} classified by ${answer.model}:${answer.version}`;
    showDrift((await modelMetadata()).drift);
  } catch (error) {
    $("results").replaceChildren();
    $("status").textContent = "";
    showError(error);
  }
  // Counts finished requests, so a test (or a user script) knows when the page shows a new answer.
  document.body.dataset.answers = Number(document.body.dataset.answers || 0) + 1;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// The service's ``decision`` (docs/selective.md), worded as the metrics label it: accept/uncertain/reject.
const DECISION_WORDS = { accept: "accepted", uncertain: "uncertain", reject: "rejected" };

function card(prediction, file, scale) {
  // ``decision`` is shown where the service sends one; ``accepted`` alone decides otherwise.
  const verdict = DECISION_WORDS[prediction.decision] ?? (prediction.accepted ? "accepted" : "rejected");
  const result = element("article", `result ${prediction.accepted ? "accepted" : "rejected"}`);
  result.dataset.filename = prediction.filename;
  const image = element("img", "thumbnail");
  image.alt = prediction.filename;
  if (file && file.type.startsWith("image/")) image.src = URL.createObjectURL(file);
  const body = element("div", "body");
  const heading = element("h2", "filename", prediction.filename);
  const label = element("p", "label");
  label.append(element("span", "class-name", prediction.label), ` ${percent(prediction.probability)}`);
  body.append(heading, element("p", "verdict", verdict.toUpperCase()), label, topK(prediction.top_k), gauge(prediction, scale));
  result.append(image, body);
  return result;
}

function topK(classes) {
  const list = element("ol", "top-k");
  for (const entry of classes) {
    const bar = element("span", "bar");
    bar.style.width = `${100 * entry.probability}%`;
    const row = element("li");
    row.append(element("span", "name", entry.label), element("span", "track"), element("span", "value", percent(entry.probability)));
    row.children[1].append(bar);
    list.append(row);
  }
  return list;
}

function gaugeScale(predictions) {
  // One scale for every card: the model's thresholds and these scores, padded, so a bar shows how
  // far its score is from the threshold in use, compared with the other images and operating points.
  const values = [...thresholds, ...predictions.flatMap((p) => [p.ood_score.value, p.threshold])];
  const low = Math.min(...values);
  const high = Math.max(...values);
  const pad = (high - low || Math.abs(high) || 1) * 0.25;
  return (value) => `${(100 * (value - low + pad)) / (high - low + 2 * pad)}%`;
}

function gauge(prediction, position) {
  const score = prediction.ood_score.value;
  const track = element("div", "gauge");
  const fill = element("div", "fill");
  fill.style.width = position(score);
  const mark = element("div", "mark");
  mark.style.left = position(prediction.threshold);
  mark.title = `threshold ${prediction.threshold}`;
  track.append(fill, mark);
  const numbers = element("p", "numbers",
    `OOD score (${prediction.ood_score.name}) ${score.toPrecision(4)} ${score <= prediction.threshold ? "≤" : ">"} ` +
    `threshold ${prediction.threshold.toPrecision(4)} at ${percent(prediction.operating_point)} ID acceptance · ` +
    `p-value ${prediction.p_value.toPrecision(3)}`);
  const wrapper = element("div", "ood");
  wrapper.append(track, numbers);
  return wrapper;
}

function setUp() {
  const drop = $("drop");
  $("files").addEventListener("change", () => {
    classify([...$("files").files]);
    $("files").value = "";  // choosing the same file again is a change, too
  });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    classify([...event.dataTransfer.files]);
  });
  $("model").addEventListener("change", () => loadOperatingPoints().then(() => classify(lastFiles), showError));
  for (const id of ["operating-point", "top-k"]) $(id).addEventListener("change", () => classify(lastFiles));
  loadModels().catch(showError);
}

setUp();
