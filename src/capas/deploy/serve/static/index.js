// The index page: upload an image, show it and the top classes as bars, optionally send feedback.
"use strict";
const $ = (id) => document.getElementById(id);
let lastId = null;

async function loadInfo() {
  // no test figures here: a 1,000-class run's confusion matrix is 2 MB
  const info = await (await fetch("/info?confusion_matrix=false")).json();
  $("model").textContent = `${info.model} (${info.parameters.toLocaleString()} parameters)`;
  const [h, w, c] = info.input_shape;
  const { max_pixels, max_request_pixels, max_body_mb } = info.serving; // larger images or files are refused
  const megapixels = Math.min(max_pixels, max_request_pixels) / 1e6;
  $("expects").textContent = `up to ${megapixels.toLocaleString("en")} megapixels and ${max_body_mb} MB; ` +
    `resized to ${h}×${w}, ${c === 1 ? "grey" : "colour"}, as in training`;
  $("truth").replaceChildren(...info.classes.map((name, i) => new Option(name, i)));
}

function showResults(prediction) {
  const rows = prediction.top.map(({ label, probability }) => {
    const row = document.createElement("div");
    row.className = "row";
    row.dataset.label = label;
    row.innerHTML = `<span class="label"></span><div><div class="bar"></div></div><span class="p"></span>`;
    row.querySelector(".label").textContent = label;
    row.querySelector(".bar").style.width = `${(probability * 100).toFixed(1)}%`;
    row.querySelector(".p").textContent = `${(probability * 100).toFixed(1)}%`;
    return row;
  });
  const title = document.createElement("p");
  title.innerHTML = `Prediction: <strong id="top-label"></strong>`;
  title.querySelector("strong").textContent = prediction.label;
  $("results").replaceChildren(title, ...rows);
}

/** The answer to a call as {ok, data}; {ok: false, data: {detail}} when the server is unreachable or
answers without JSON (uvicorn's own 503 when every connection is taken), so the page never hangs. */
async function call(url, options) {
  try {
    const response = await fetch(url, options);
    const data = await response.json().catch(() => ({ detail: response.statusText || "no JSON answer" }));
    return { ok: response.ok, data: response.ok ? data : { detail: `error ${response.status}: ${data.detail}` } };
  } catch (error) {
    return { ok: false, data: { detail: `no answer from the server (${error.message})` } };
  }
}

async function predict(file) {
  $("result").hidden = false;
  $("preview").src = URL.createObjectURL(file);
  $("results").textContent = "predicting…";
  const body = new FormData();
  body.append("file", file);
  const { ok, data } = await call("/predict", { method: "POST", body });
  if (!ok) {
    $("results").innerHTML = `<p class="error"></p>`;
    $("results").firstChild.textContent = data.detail;
    $("feedback").hidden = true;
    return;
  }
  const prediction = data.predictions[0];
  lastId = prediction.id;
  showResults(prediction);
  $("truth").value = prediction.index;
  $("feedback-status").textContent = "";
  $("feedback").hidden = false;
}

async function sendFeedback() {
  const { ok, data } = await call("/feedback", {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ id: lastId, label: Number($("truth").value) }),
  });
  $("feedback-status").textContent = ok
    ? `thanks: live accuracy ${(data.accuracy * 100).toFixed(1)}% over ${data.feedback} feedbacks ` +
      `(95% CI ${(data.accuracy_ci[0] * 100).toFixed(1)}–${(data.accuracy_ci[1] * 100).toFixed(1)}%)`
    : data.detail;
}

$("file").addEventListener("change", (e) => e.target.files[0] && predict(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) predict(e.dataTransfer.files[0]);
});
$("send").addEventListener("click", sendFeedback);
loadInfo();
