// Tiny canvas charts (no library, nothing fetched): lines with gaps for missing values, and stacked bars.
"use strict";
const PALETTE = ["#2f6fde", "#e8793a", "#1f8a4c", "#c0362c", "#7b52c7", "#8c6d31", "#d6559d", "#5f6b7a", "#b5a300", "#17a2b8"];

function setup(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const { width, height } = canvas.getBoundingClientRect();
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  ctx.font = "11px system-ui, sans-serif";
  return { ctx, width, height, pad: { l: 44, r: 10, t: 8, b: 22 } };
}

function axes(g, times, yMax, yFormat) {
  const { ctx, width, height, pad } = g;
  ctx.strokeStyle = "#d0d5dd";
  ctx.fillStyle = "#667085";
  for (let i = 0; i <= 4; i++) {
    const y = pad.t + ((height - pad.t - pad.b) * i) / 4;
    ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(width - pad.r, y); ctx.stroke();
    ctx.fillText(yFormat(yMax * (1 - i / 4)), 2, y + 4);
  }
  if (times.length) {
    const label = (t) => new Date(t * 1000).toLocaleTimeString();
    ctx.fillText(label(times[0]), pad.l, height - 6);
    const last = label(times[times.length - 1]);
    ctx.fillText(last, width - pad.r - ctx.measureText(last).width, height - 6);
  }
}

function xOf(g, i, n) {
  const { width, pad } = g;
  return pad.l + (n <= 1 ? 0.5 : i / (n - 1)) * (width - pad.l - pad.r);
}

function yOf(g, v, yMax) {
  const { height, pad } = g;
  return height - pad.b - (Math.min(v, yMax) / yMax) * (height - pad.t - pad.b);
}

/** series: [{name, values (null = no data), color}] over `times`; yMax fixed or from the data. */
function lineChart(canvas, times, series, { yMax = null, yFormat = (v) => v.toFixed(2) } = {}) {
  const g = setup(canvas);
  const all = series.flatMap((s) => s.values.filter((v) => v !== null && Number.isFinite(v)));
  const top = yMax ?? Math.max(1e-9, ...all) * 1.1;
  axes(g, times, top, yFormat);
  for (const s of series) {
    g.ctx.strokeStyle = g.ctx.fillStyle = s.color;
    g.ctx.lineWidth = 2;
    g.ctx.beginPath();
    let drawing = false;
    s.values.forEach((v, i) => {
      if (v === null || !Number.isFinite(v)) { drawing = false; return; }
      const x = xOf(g, i, times.length), y = yOf(g, v, top);
      if (drawing) g.ctx.lineTo(x, y); else g.ctx.moveTo(x, y);
      g.ctx.fillRect(x - 2, y - 2, 4, 4);
      drawing = true;
    });
    g.ctx.stroke();
  }
}

/** stacks: one array per time of values per series (already shares or counts). */
function stackedBars(canvas, times, stacks, colors, { yMax = null, yFormat = (v) => v.toFixed(0) } = {}) {
  const g = setup(canvas);
  // counts: a multiple of 4, so each of the 4 gridlines falls on the whole number its label shows
  const top = yMax ?? 4 * Math.ceil(Math.max(1, ...stacks.map((s) => s.reduce((a, b) => a + b, 0))) / 4);
  axes(g, times, top, yFormat);
  const slot = (g.width - g.pad.l - g.pad.r) / Math.max(1, times.length);
  stacks.forEach((values, i) => {
    let base = 0;
    values.forEach((v, k) => {
      if (!v) return;
      g.ctx.fillStyle = colors[k % colors.length];
      const y0 = yOf(g, base, top), y1 = yOf(g, base + v, top);
      g.ctx.fillRect(g.pad.l + i * slot + slot * 0.1, y1, slot * 0.8, y0 - y1);
      base += v;
    });
  });
}

function legend(element, names, colors) {
  element.replaceChildren(...names.map((name, i) => {
    const span = document.createElement("span");
    span.innerHTML = `<i style="background:${colors[i % colors.length]}"></i>`;
    span.append(name);
    return span;
  }));
}
