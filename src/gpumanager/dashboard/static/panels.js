// The other panels: spend, queue, last wakes, last requests (admins); models and usage (users).

import { bars, timeline } from "./charts.js";
import { dollars, el, fill, seconds, time } from "./format.js";

const $ = (id) => document.getElementById(id);

export function renderAdminTables(state) {
  const queue = Object.entries(state.queue).sort((a, b) => b[1] - a[1]);
  fill($("queue").tBodies[0], queue.map(([model, n]) => el("tr", {}, el("td", { text: model }), el("td", { class: "num", text: n }))), "nobody waits");

  fill($("wakes").tBodies[0], state.wakes.map((wake) => el("tr", {},
    el("td", {}, time(wake.time)),
    el("td", { text: wake.host }),
    el("td", { text: wake.by ? `${wake.by}${wake.model ? ` (${wake.model})` : ""}` : wake.model || "found running" }),
    el("td", { title: wake.error || "", text: wake.outcome + (wake.seconds ? ` in ${seconds(wake.seconds)}` : "") }),
    ...["resume", "boot", "model", "first_byte"].map((phase) => el("td", { class: "num", text: seconds(wake.phases[phase]) })),
  )), "no wake since gpumanager started");

  fill($("requests").tBodies[0], state.requests.map((r) => el("tr", {},
    el("td", {}, time(r.time)),
    el("td", { title: r.key, text: r.name }),
    el("td", { text: r.model }),
    el("td", { text: r.host || "–" }),
    el("td", { class: "num", text: r.status }),
    el("td", { class: "num", text: r.prompt_tokens === null && r.completion_tokens === null ? "–" : `${r.prompt_tokens ?? "?"} + ${r.completion_tokens ?? "?"}` }),
    el("td", { class: "num", text: seconds(r.seconds) }),
  )), "no request since gpumanager started");

  const budget = state.budget;
  const rows = [
    ["Cloud spend today", dollars(budget.dollars_today) + (budget.daily_dollars ? ` of ${dollars(budget.daily_dollars)}` : "")],
    ["Cloud spend this month", dollars(budget.dollars_this_month) + (budget.monthly_dollars ? ` of ${dollars(budget.monthly_dollars)}` : "")],
  ];
  if (budget.capped) rows.push(["Spend cap", budget.capped]);
  const spend = $("spend").tBodies[0];
  spend.replaceChildren(...rows.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { class: "num", text: v }))));
  spend.append(...extraRows(spend));
}

// The rows the ledger's history adds to the spend table, kept across the live refreshes.
function extraRows(spend) {
  const extra = spend.dataset.extra ? JSON.parse(spend.dataset.extra) : [];
  return extra.map(([k, v]) => el("tr", { class: "extra" }, el("th", { text: k }), el("td", { class: "num", text: v })));
}

export function renderHistory(history) {
  const range = { since: history.since, until: history.until };
  bars($("chart-requests"), history.requests_per_minute, { ...range, slot: 60, kind: "requests", unit: (v) => `${v}/min` });
  const hourly = history.dollars_per_hour.map(([label, value]) => [Date.parse(label.replace(" ", "T") + ":00Z") / 1000, value]);
  bars($("chart-dollars"), hourly, { ...range, slot: 3600, kind: "dollars", unit: (v) => dollars(v) + "/h" });
  timeline($("chart-awake"), history.awake || {}, range);

  fill($("spend-keys").tBodies[0], (history.spend_by_key || []).map((k) =>
    el("tr", {}, el("td", { title: k.key, text: k.name || k.key }), el("td", { class: "num", text: dollars(k.dollars) }))), "nothing spent today");
  const saved = (history.savings || []).reduce((sum, s) => sum + s.saved, 0);
  const always = (history.savings || []).reduce((sum, s) => sum + s.always_on, 0);
  const extra = [["Billed this month (ledger)", dollars(history.spend_month ?? 0)]];
  if (always) extra.push(["Saved against always-on this month", `${dollars(saved)} of ${dollars(always)}`]);
  const spend = $("spend").tBodies[0];
  spend.dataset.extra = JSON.stringify(extra);
  for (const row of spend.querySelectorAll("tr.extra")) row.remove();
  spend.append(...extraRows(spend));
}

export function renderUser(state) {
  fill($("models").tBodies[0], state.models.map((m) => el("tr", { "data-model": m.model },
    el("td", { text: m.model }),
    el("td", {}, el("span", { class: "state", "data-state": m.awake ? "ready" : m.waking ? "resuming" : "paused",
      text: m.awake ? "awake" : m.waking ? "waking" : "asleep: woken by your first request" })),
  )), "this key may use no model of the fleet");

  const usage = state.usage;
  const today = state.today;
  const month = state.month;
  const rows = [
    ["Requests today", today ? today.requests : 0],
    ["Tokens today", usage.tokens_today.toLocaleString()],
    ["GPU cost today", dollars(usage.dollars_today)],
    ["GPU cost this month", dollars(usage.dollars_this_month)],
    ["Requests this month", month ? month.requests : 0],
  ];
  $("usage").tBodies[0].replaceChildren(...rows.map(([k, v]) => el("tr", {}, el("th", { text: k }), el("td", { class: "num", text: v }))));
  const limits = Object.entries(usage.limits);
  fill($("limits").tBodies[0], limits.map(([k, v]) => el("tr", {}, el("th", { text: k.replaceAll("_", " ") }), el("td", { class: "num", text: Array.isArray(v) ? v.join(", ") : v }))), "no limits");
  if (limits.length) {
    $("limits").tBodies[0].append(
      el("tr", {}, el("th", { text: "day resets" }), el("td", { class: "num", text: usage.day_resets_at })),
      el("tr", {}, el("th", { text: "month resets" }), el("td", { class: "num", text: usage.month_resets_at })),
    );
  }
}
