// The admin's hosts panel: one row per host, its live state, and the buttons that steer it.

import { bytes, clock, dollars, el, fill } from "./format.js";

// What the page calls a host's state: the lifecycle's word, "draining" while a pause waits for requests.
export function shownState(host) {
  return host.draining && host.status === "ready" ? "draining" : host.status;
}

async function act(method, path, question) {
  if (question && !window.confirm(question)) return;
  const response = await fetch(path, { method, headers: { accept: "application/json" } });
  if (!response.ok) {
    let message = `${response.status}`;
    try {
      const body = await response.json();
      message = body.error?.message ?? body.error ?? message;
    } catch { /* not JSON */ }
    window.alert(`${method} ${path}: ${message}`);
  }
  document.dispatchEvent(new Event("fleet-changed")); // show what the action began (a drain) at once
}

function gpus(host) {
  if (!host.gpus || !host.gpus.length) return el("span", { class: "muted", text: "–" });
  const box = el("div");
  for (const gpu of host.gpus) {
    const parts = [`GPU ${gpu.gpu}`];
    if (gpu.utilization !== null && gpu.utilization !== undefined) parts.push(`${Math.round(gpu.utilization * 100)} %`);
    if (gpu.memory_used_bytes !== null && gpu.memory_total_bytes) {
      parts.push(`${bytes(gpu.memory_used_bytes)} / ${bytes(gpu.memory_total_bytes)}`);
    }
    if (gpu.temperature_celsius !== null && gpu.temperature_celsius !== undefined) parts.push(`${Math.round(gpu.temperature_celsius)} °C`);
    if (gpu.power_watts !== null && gpu.power_watts !== undefined) parts.push(`${Math.round(gpu.power_watts)} W`);
    box.append(el("div", { class: "gpu", title: gpu.name || "", text: parts.join(" · ") }));
  }
  return box;
}

function models(host) {
  const loaded = new Set(host.loaded);
  const cell = el("td");
  host.models.forEach((name, i) => {
    if (i) cell.append(", ");
    cell.append(loaded.has(name) ? el("b", { text: name }) : name);
  });
  if (!host.models.length) cell.append(el("span", { class: "muted", text: host.jobs !== null && host.jobs !== undefined ? "RunPod jobs" : "–" }));
  return cell;
}

function slots(host) {
  const used = host.in_use ?? host.leases;
  const share = host.slots ? Math.min(1, host.leases / host.slots) : 0;
  const cell = el("td", { title: `${host.leases} of ${host.slots} slots in use` });
  const filled = el("span");
  filled.style.width = `${(share * 100).toFixed(0)}%`; // CSSOM, which the page's CSP allows (style attributes it does not)
  cell.append(el("span", { class: "slots" }, filled));
  cell.append(` ${host.leases}/${host.slots}`);
  if (host.jobs) cell.append(el("div", { class: "muted", text: `${host.jobs} jobs` }));
  else if (used > host.leases) cell.append(el("div", { class: "muted", text: `${used - host.leases} held` }));
  return cell;
}

function actions(host, emergency) {
  const id = encodeURIComponent(host.name);
  const cell = el("td", { class: "actions" });
  if (host.provider === "static") return cell.append(el("span", { class: "muted", text: "always on" })), cell;
  cell.append(
    el("button", {
      type: "button", "data-action": "resume", disabled: !host.can_resume,
      title: emergency ? "emergency-off is on" : `resume ${host.name} now`,
      onclick: () => act("POST", `/gpu/${id}/resume`),
      text: "Resume",
    }),
    el("button", {
      type: "button", "data-action": "pause", disabled: !host.can_pause,
      title: `pause ${host.name} once its open requests have finished`,
      onclick: () => act("POST", `/gpu/${id}/pause`, `Pause ${host.name}? Open requests finish first.`),
      text: "Pause",
    }),
    host.protected
      ? el("button", { type: "button", "data-action": "unprotect", onclick: () => act("DELETE", `/gpu/${id}/protect`),
        title: `let ${host.name} be paused when idle again`, text: "Unprotect" })
      : el("button", { type: "button", "data-action": "protect", onclick: () => act("POST", `/gpu/${id}/protect`),
        title: `never pause ${host.name} for idleness`, text: "Protect" }),
  );
  return cell;
}

// Render every host; `receivedAt` is when the state arrived (the countdowns run from it).
export function renderHosts(tbody, hosts, { emergency, receivedAt }) {
  const rows = hosts.map((host) => {
    const state = shownState(host);
    const left = host.idle_seconds_left;
    const countdown = el("td", { class: "num countdown" });
    if (left !== null && left !== undefined && !host.protected && state === "ready") {
      countdown.dataset.deadline = String(receivedAt + left);
    } else {
      countdown.textContent = host.protected ? "protected" : "–";
    }
    const stateCell = el("td", {}, el("span", { class: "state", "data-state": state, text: state }));
    if (host.protected) stateCell.append(el("span", { class: "flag", text: "protected" }));
    if (host.last_error && state === "failed") stateCell.append(el("div", { class: "muted", text: host.last_error }));
    return el("tr", { "data-host": host.name },
      el("td", { title: host.cloud_status || "" }, el("b", { text: host.name }), el("div", { class: "muted", text: host.provider })),
      stateCell,
      models(host),
      slots(host),
      countdown,
      el("td", { class: "num", text: host.cost_per_hour ? dollars(host.cost_per_hour) : "–" }),
      el("td", {}, gpus(host)),
      actions(host, emergency),
    );
  });
  fill(tbody, rows, "no hosts");
  tick(tbody);
}

// The live countdowns ("pauses in 4:12"), once a second.
export function tick(root) {
  const now = Date.now() / 1000;
  for (const cell of root.querySelectorAll("td.countdown[data-deadline]")) {
    const left = Number(cell.dataset.deadline) - now;
    cell.textContent = left > 0 ? clock(left) : "now";
    cell.title = new Date(Number(cell.dataset.deadline) * 1000).toLocaleString();
  }
}

// A host's state changed (an event): show it at once, before the next full refresh.
export function showState(tbody, host, state) {
  const badge = tbody.querySelector(`tr[data-host="${CSS.escape(host)}"] .state`);
  if (badge) {
    badge.dataset.state = state;
    badge.textContent = state;
  }
}

export function emergencyButtons(on) {
  document.getElementById("emergency-off").hidden = on;
  document.getElementById("emergency-on").hidden = !on;
  const banner = document.getElementById("emergency-state");
  banner.replaceChildren(on ? el("span", { class: "emergency", text: "EMERGENCY OFF: no host is woken" }) : "");
}

export function wireEmergency() {
  document.getElementById("emergency-off").addEventListener("click", () =>
    act("POST", "/gpu/emergency-off", "Emergency off: pause EVERY host now, ending running requests, and wake none until you turn it back on?"));
  document.getElementById("emergency-on").addEventListener("click", () =>
    act("POST", "/gpu/emergency-on", "Let hosts be woken on demand again?"));
}
