// The monitor page: polls /monitor/data every 2 s and redraws the charts.
"use strict";
const byId = (id) => document.getElementById(id);
const percent = (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(1)}%`);
// An accuracy from a few feedbacks is shown with its 95% interval: 2 of 2 right is not a plain 100%.
const withInterval = (v, ci) => (ci ? `${percent(v)} (95% CI ${percent(ci[0])}–${percent(ci[1])})` : percent(v));

function draw(data) {
  const w = data.windows;
  const times = w.map((x) => x.t);
  const t = data.totals;
  byId("t-predictions").textContent = t.predictions.toLocaleString();
  byId("t-feedback").textContent = t.feedback.toLocaleString();
  byId("t-accuracy").textContent = withInterval(t.accuracy, t.accuracy_ci);
  byId("t-rolling").textContent = withInterval(t.rolling_accuracy, t.rolling_accuracy_ci);
  byId("window-note").textContent = `one point per ${data.bucket_s} s window; ${w.length} windows kept`;

  const drift = data.drift;
  const badge = byId("drift-status");
  badge.textContent = drift.status;
  badge.className = `badge ${drift.status === "ok" ? "ok" : drift.status === "drift" ? "drift" : ""}`;
  // Without a drift reference there is nothing to chart: the sentence saying why replaces the chart.
  byId("drift-off").hidden = drift.enabled;
  byId("drift-off").textContent = drift.enabled ? "" : `Drift monitoring is off: ${drift.reason}.`;
  byId("c-drift").hidden = byId("l-drift").hidden = !drift.enabled;
  const r = drift.result;
  byId("drift-detail").textContent = !drift.enabled
    ? drift.reason
    : r
    ? `MMD² ${r.statistic.toFixed(4)}, p = ${r.p_value.toFixed(4)} (alpha ${r.alpha}, ${r.window} recent inputs vs ` +
      `${r.reference} reference, ${r.permutations} permutations); pixel mean KS p = ` +
      `${r.input_stats.pixel_mean.p_value.toFixed(4)}, pixel std KS p = ${r.input_stats.pixel_std.p_value.toFixed(4)}`
    : `${drift.window} recent inputs collected`;

  lineChart(byId("c-accuracy"), times, [{ name: "accuracy", values: w.map((x) => x.accuracy), color: PALETTE[0] }],
    { yMax: 1, yFormat: (v) => `${(v * 100).toFixed(0)}%` });
  stackedBars(byId("c-volume"), times, w.map((x) => [x.predictions]), [PALETTE[0]]);
  const shares = w.map((x) => x.class_counts.map((c) => (x.predictions ? c / x.predictions : 0)));
  stackedBars(byId("c-shares"), times, shares, PALETTE, { yMax: 1, yFormat: (v) => `${(v * 100).toFixed(0)}%` });
  legend(byId("l-shares"), data.classes.map((c) => `${c} ${percent(t.class_shares[c])}`), PALETTE);
  const lat = ["p50", "p90", "p99"];
  lineChart(byId("c-latency"), times,
    lat.map((p, i) => ({ name: p, values: w.map((x) => x.latency_ms[p]), color: PALETTE[i] })),
    { yFormat: (v) => v.toFixed(1) });
  legend(byId("l-latency"), lat, PALETTE);
  if (!drift.enabled) return;
  lineChart(byId("c-drift"), times, [
    { name: "MMD²", values: w.map((x) => x.drift_statistic), color: PALETTE[3] },
    { name: "p-value", values: w.map((x) => x.drift_p_value), color: PALETTE[2] },
  ], { yFormat: (v) => v.toFixed(2) });
  legend(byId("l-drift"), ["MMD²", "p-value"], [PALETTE[3], PALETTE[2]]);
}

let updated = null; // when the figures shown were last fetched

async function refresh() {
  try {
    const response = await fetch("/monitor/data");
    if (!response.ok) throw new Error(`error ${response.status}`);
    draw(await response.json());
    updated = new Date();
    byId("stale").hidden = true;
  } catch (error) {
    // The figures on the page are no longer current: say so, rather than show them as live.
    byId("stale").hidden = false;
    byId("stale").textContent = `Not updated since ${updated ? updated.toLocaleTimeString() : "the page opened"}: ` +
      `the server did not answer (${error.message}).`;
  } finally {
    setTimeout(refresh, 2000);
  }
}
refresh();
