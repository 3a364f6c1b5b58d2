// The page: who is logged in, the admin's or the user's view, kept live by the event stream.

import { el } from "./format.js";
import { emergencyButtons, renderHosts, showState, tick, wireEmergency } from "./hosts.js";
import { renderAdminTables, renderHistory, renderUser } from "./panels.js";
import { connect } from "./stream.js";

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 5000; // a full reload of the state even when no event came
const HISTORY_MS = 10000; // the charts and the day's spend (the server reads its ledger at most every 5 s)
let me = null;
let pending = null;
let historyAt = 0;

function showLogin(reason) {
  for (const id of ["admin", "user"]) $(id).hidden = true;
  $("logout").hidden = true;
  $("who").textContent = "";
  $("login").hidden = false;
  const message = $("login-message");
  message.hidden = !reason;
  message.textContent = reason || "";
}

async function load() {
  const response = await fetch("/dashboard/api/state", { headers: { accept: "application/json" } });
  if (response.status === 401) {
    showLogin(me ? "Your session has ended (logged out, expired, or the key was revoked). Log in again." : loginReason());
    me = null;
    return false;
  }
  if (!response.ok) return true; // shutting down or restarting: the stream's reconnect will retry
  const state = await response.json();
  me = state.me;
  $("login").hidden = true;
  $("logout").hidden = false;
  $("who").replaceChildren(el("span", { text: `${state.me.name}${state.me.admin ? " (admin)" : ""}` }));
  if (state.me.admin) {
    $("admin").hidden = false;
    renderHosts($("hosts").tBodies[0], state.hosts, { emergency: state.emergency, receivedAt: Date.now() / 1000 });
    emergencyButtons(state.emergency);
    renderAdminTables(state);
    if (Date.now() - historyAt > HISTORY_MS) loadHistory();
  } else {
    $("user").hidden = false;
    renderUser(state);
  }
  return true;
}

async function loadHistory() {
  historyAt = Date.now();
  const response = await fetch("/dashboard/api/history", { headers: { accept: "application/json" } });
  if (response.ok) renderHistory(await response.json());
}

// Many events come in bursts (a wake, a stream's end): one reload for each burst.
function soon(delay = 250) {
  if (pending === null) pending = setTimeout(() => { pending = null; load(); }, delay);
}

function loginReason() {
  const asked = new URLSearchParams(location.search).get("login");
  if (asked === "failed") return "That key is unknown or revoked.";
  if (asked === "expired") return "That login link was used already or has expired.";
  return "";
}

async function start() {
  wireEmergency();
  if (!(await load())) return;
  if (location.search) history.replaceState(null, "", "/dashboard");
  connect({
    indicator: $("live"),
    onOpen: () => soon(0),
    onClosed: async () => {
      try {
        return await load();
      } catch {
        return true; // gpumanager is down (a restart): try the stream again
      }
    },
    onEvent: (type, data) => {
      if (type === "host_state") historyAt = 0; // a wake or a pause: the timeline and spend move too
      if (type === "host_state" && me?.admin) showState($("hosts").tBodies[0], data.host, data.new);
      if (type === "host_state" && !me?.admin) soon(0);
      else if (type !== "snapshot") soon();
    },
  });
  document.addEventListener("fleet-changed", () => soon(0));
  setInterval(() => tick(document), 1000);
  setInterval(() => me && load(), REFRESH_MS);
}

start();
