// The page's SVG charts, drawn by hand: bars over 24 hours, and a timeline of each host's awake time.

const NS = "http://www.w3.org/2000/svg";
const WIDTH = 720;
const LEFT = 44;

function svg(height) {
  const node = document.createElementNS(NS, "svg");
  node.setAttribute("viewBox", `0 0 ${WIDTH} ${height}`);
  node.setAttribute("role", "img");
  return node;
}

function add(parent, tag, attrs, text) {
  const node = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  parent.append(node);
  return node;
}

function hourLabels(root, since, until, top, bottom) {
  const span = until - since;
  const first = Math.ceil(since / 21600) * 21600; // every 6 hours
  for (let t = first; t < until; t += 21600) {
    const x = LEFT + ((t - since) / span) * (WIDTH - LEFT);
    add(root, "line", { x1: x, x2: x, y1: top, y2: bottom, class: "axis" });
    const label = new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    if (x < WIDTH - 40) add(root, "text", { x: x + 2, y: bottom + 11 }, label);
  }
}

// points: [[unix start, value], ...]; `slot` is each bar's width in seconds.
export function bars(container, points, { since, until, slot, kind, unit }) {
  const height = 110;
  const top = 6;
  const bottom = height - 16;
  const root = svg(height);
  const most = Math.max(0, ...points.map((p) => p[1]));
  const span = until - since;
  add(root, "line", { x1: LEFT, x2: WIDTH, y1: bottom, y2: bottom, class: "axis" });
  add(root, "text", { x: 0, y: top + 8 }, most ? `${unit(most)}` : "none");
  hourLabels(root, since, until, top, bottom);
  let path = "";
  const width = Math.max(1, (slot / span) * (WIDTH - LEFT));
  for (const [start, value] of points) {
    if (!value || start + slot < since) continue;
    const x = LEFT + ((start - since) / span) * (WIDTH - LEFT);
    const h = most ? (value / most) * (bottom - top) : 0;
    path += `M${x.toFixed(1)} ${bottom}h${width.toFixed(2)}v${(-h).toFixed(1)}h${(-width).toFixed(2)}z`;
  }
  if (path) add(root, "path", { d: path, class: kind });
  add(root, "title", {}, `${points.length} ${kind} points; the highest ${unit(most)}`);
  container.replaceChildren(root);
}

// periods: {host: [[start, end], ...]}
export function timeline(container, periods, { since, until }) {
  const hosts = Object.keys(periods).sort();
  const row = 18;
  const height = Math.max(1, hosts.length) * row + 18;
  const bottom = height - 16;
  const root = svg(height);
  const span = until - since;
  hourLabels(root, since, until, 0, bottom);
  if (!hosts.length) add(root, "text", { x: LEFT, y: 12 }, "no host was awake");
  hosts.forEach((host, i) => {
    const y = i * row + 3;
    add(root, "text", { x: 0, y: y + 10 }, host.length > 8 ? host.slice(0, 7) + "…" : host);
    for (const [start, end] of periods[host]) {
      const x = LEFT + ((Math.max(start, since) - since) / span) * (WIDTH - LEFT);
      const w = Math.max(1, ((Math.min(end, until) - Math.max(start, since)) / span) * (WIDTH - LEFT));
      const bar = add(root, "rect", { x: x.toFixed(1), y, width: w.toFixed(1), height: row - 6, class: "awake" });
      const from = new Date(start * 1000).toLocaleTimeString();
      const to = new Date(end * 1000).toLocaleTimeString();
      add(bar, "title", {}, `${host} awake ${from}–${to}`);
    }
  });
  container.replaceChildren(root);
}
