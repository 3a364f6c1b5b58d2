// The event stream: /dashboard/api/events as Server-Sent Events, reconnected after any break
// (a restart of gpumanager included). `onEvent(type, data)` gets each event; `onOpen()` runs on
// every (re)connection, so the page reloads its state after whatever it missed.

const TYPES = ["snapshot", "host_state", "wake_started", "wake_phase", "wake_failed", "pause_warning",
  "paused", "request", "budget", "emergency", "key", "lost", "ended"];

export function connect({ onEvent, onOpen, onClosed, indicator }) {
  let source = null;
  let retry = null;
  let delay = 500;

  function status(text, on) {
    indicator.textContent = text;
    indicator.className = "live " + (on ? "on" : "off");
  }

  // The stream ended for good (refused, or the session ended): ask the page why, then maybe again.
  function closed() {
    source.close();
    onClosed().then((again) => {
      if (again && retry === null) retry = setTimeout(open, delay);
      delay = Math.min(delay * 2, 5000);
    });
  }

  function open() {
    retry = null;
    source = new EventSource("/dashboard/api/events");
    source.onopen = () => {
      delay = 500;
      status("live", true);
      onOpen();
    };
    source.onerror = () => {
      status("reconnecting…", false);
      if (source.readyState === EventSource.CLOSED) closed(); // refused, or down for good
    };
    for (const type of TYPES) {
      source.addEventListener(type, (message) => {
        if (type === "ended") closed(); // the session ended: no reconnect until the page knows why
        else onEvent(type, JSON.parse(message.data));
      });
    }
  }

  open();
  return { close: () => source && source.close() };
}
