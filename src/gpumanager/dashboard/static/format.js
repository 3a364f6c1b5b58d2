// Small helpers every panel uses: building elements, numbers with units, relative times.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function fill(tbody, rows, empty) {
  tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 20, class: "muted", text: empty }))]));
}

export function dollars(value) {
  if (value === null || value === undefined) return "–";
  if (value > 0 && value < 0.005) return "< $0.01"; // spent, if not yet a cent
  return "$" + (Math.abs(value) < 10 ? value.toFixed(2) : value.toFixed(0));
}

export function seconds(value) {
  if (value === null || value === undefined) return "–";
  return value < 10 ? value.toFixed(2) + " s" : value.toFixed(0) + " s";
}

export function clock(totalSeconds) {
  const s = Math.max(0, Math.round(totalSeconds));
  const m = Math.floor(s / 60);
  return m >= 60 ? `${Math.floor(m / 60)}:${String(m % 60).padStart(2, "0")}:${String(s % 60).padStart(2, "0")}`
    : `${m}:${String(s % 60).padStart(2, "0")}`;
}

export function ago(unixSeconds) {
  const delta = Date.now() / 1000 - unixSeconds;
  if (delta < 60) return `${Math.max(0, Math.round(delta))} s ago`;
  if (delta < 3600) return `${Math.round(delta / 60)} min ago`;
  return `${Math.round(delta / 3600)} h ago`;
}

export function time(unixSeconds, text) {
  const at = new Date(unixSeconds * 1000);
  return el("time", { datetime: at.toISOString(), title: at.toLocaleString(), text: text ?? ago(unixSeconds) });
}

export function bytes(value) {
  if (value === null || value === undefined) return "–";
  const gib = value / 2 ** 30;
  return gib >= 1 ? gib.toFixed(1) + " GiB" : (value / 2 ** 20).toFixed(0) + " MiB";
}
