// Progressive enhancement: without this script both forms still post and the server renders the answer.
"use strict";

const $ = (id) => document.getElementById(id);

// What the route means for this item, in the same words as page.py's `route_note`. An input is sure only
// above its threshold (strict >, as the cascade routes): a row with one modality goes to it however unsure.
const WHAT = { text: "description", image: "photo" };

function routeNote(r) {
  const thresholds = { text: Number($("result").dataset.textThreshold), image: Number($("result").dataset.imageThreshold) };
  const given = Object.keys(r.experts).filter((kind) => r.experts[kind]);
  const sure = (kind) => r.experts[kind].probability > thresholds[kind];
  if (WHAT[r.route] && given.length === 1) {
    const limit = `${(100 * thresholds[r.route]).toFixed(0)}%`;
    return sure(r.route) ? `only the ${WHAT[r.route]} was used, and it was sure enough (above ${limit})`
      : `only the ${WHAT[r.route]} was used: its best guess, not sure (${limit} or less)`;
  }
  if (WHAT[r.route]) return `the ${WHAT[r.route]} alone was sure enough`;
  if (r.route === "blend") return given.some(sure) ? "both were combined" : "neither was sure alone: both were blended";
  return "no usable input: the most frequent class";
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
  } catch (e) { /* not JSON: fall through */ }
  return `server answered ${response.status}`;
}

function bar(name, p) {
  const li = document.createElement("li");
  const label = document.createElement("span");
  label.className = "name";
  label.textContent = name;
  label.title = name;
  const track = document.createElement("span");
  track.className = "bar";
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.width = (100 * p).toFixed(1) + "%";
  track.appendChild(fill);
  const pct = document.createElement("span");
  pct.className = "pct";
  pct.textContent = (100 * p).toFixed(1) + "%";
  li.append(label, track, pct);
  return li;
}

function showResult(r) {
  $("typology").textContent = r.typology;
  $("route").textContent = r.route;
  $("route-note").textContent = routeNote(r);
  $("bars").replaceChildren(...r.classes.slice(0, 5).map((c, i) => bar(c, r.probabilities[i])));
  const parts = [];
  for (const kind of ["text", "image"]) {
    const e = r.experts[kind];
    if (e) parts.push(`${kind} expert: ${e.typology} ${(100 * e.probability).toFixed(1)}%`);
  }
  $("experts").textContent = parts.join(" · ");
  $("warnings").replaceChildren(...r.warnings.map((w) => Object.assign(document.createElement("li"), { textContent: w })));
  $("result").hidden = false;
}

$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.hidden = !file;
  if (file) preview.src = URL.createObjectURL(file);
});

$("predict-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const data = new FormData(form);
  const file = $("image").files[0];
  if (!file) data.delete("image"); // an empty file field means "no image"
  const button = form.querySelector("button");
  button.disabled = true;
  showError("");
  try {
    const response = await fetch("/predict", { method: "POST", body: data });
    if (!response.ok) throw new Error(await errorMessage(response));
    showResult(await response.json());
  } catch (e) {
    $("result").hidden = true;
    showError(e.message);
  } finally {
    button.disabled = false;
  }
});

async function follow(job) {
  const status = $("job-status");
  const progress = $("job-progress");
  for (;;) {
    const response = await fetch(`/jobs/${job.id}`);
    if (!response.ok) throw new Error(await errorMessage(response));
    job = await response.json();
    progress.max = Math.max(job.rows_total, 1);
    progress.value = job.rows_done;
    status.textContent = `${job.rows_done} of ${job.rows_total} rows · ${job.state}`;
    if (job.state === "done") {
      const link = $("job-download");
      link.href = job.download;
      link.hidden = false;
      return;
    }
    if (job.state === "error") throw new Error(job.error);
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

$("submit-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const data = new FormData(form);
  data.delete("page"); // ask for JSON, not the no-JS redirect
  const button = form.querySelector("button");
  button.disabled = true;
  $("job").hidden = false;
  $("job-download").hidden = true;
  $("job-status").textContent = "uploading…";
  try {
    const response = await fetch("/submit", { method: "POST", body: data });
    if (!response.ok) throw new Error(await errorMessage(response));
    await follow(await response.json());
  } catch (e) {
    $("job-status").textContent = e.message;
  } finally {
    button.disabled = false;
  }
});
