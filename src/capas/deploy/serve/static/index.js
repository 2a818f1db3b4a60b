// The index page: upload an image, show it and the top classes as bars, optionally send feedback.
"use strict";
const $ = (id) => document.getElementById(id);
let lastId = null;

async function loadInfo() {
  const info = await (await fetch("/info")).json();
  $("model").textContent = `${info.model} (${info.parameters.toLocaleString()} parameters)`;
  const [h, w, c] = info.input_shape;
  $("expects").textContent = `any size; resized to ${h}×${w}, ${c === 1 ? "grey" : "colour"}, as in training`;
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

async function predict(file) {
  $("result").hidden = false;
  $("preview").src = URL.createObjectURL(file);
  $("results").textContent = "predicting…";
  const body = new FormData();
  body.append("file", file);
  const response = await fetch("/predict", { method: "POST", body });
  const data = await response.json();
  if (!response.ok) {
    $("results").innerHTML = `<p class="error"></p>`;
    $("results").firstChild.textContent = `error ${response.status}: ${data.detail}`;
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
  const response = await fetch("/feedback", {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ id: lastId, label: Number($("truth").value) }),
  });
  const data = await response.json();
  $("feedback-status").textContent = response.ok
    ? `thanks: live accuracy ${(data.accuracy * 100).toFixed(1)}% over ${data.feedback} feedbacks`
    : `error: ${data.detail}`;
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
