const svgNS = "http://www.w3.org/2000/svg";
const text = (value) => document.createTextNode(value);

function chart(windows, alertStarts) {
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("viewBox", "0 0 300 90");
  svg.setAttribute("preserveAspectRatio", "none");
  const n = Math.max(windows.length, 2);
  const x = (i) => (i / (n - 1)) * 296 + 2;
  const y = (score) => 45 - score * 40;
  const zero = document.createElementNS(svgNS, "line");
  Object.entries({x1: 0, x2: 300, y1: 45, y2: 45, stroke: "#d8dee4"}).forEach(([k, v]) => zero.setAttribute(k, v));
  svg.appendChild(zero);
  windows.forEach((w, i) => {
    const bar = document.createElementNS(svgNS, "rect");
    const height = w.share_negative * 40;
    Object.entries({x: x(i) - 2, y: 88 - height, width: 4, height: height,
                    fill: alertStarts.has(w.start) ? "#c62828" : "#ef9a9a"}).forEach(([k, v]) => bar.setAttribute(k, v));
    svg.appendChild(bar);
  });
  const line = document.createElementNS(svgNS, "polyline");
  line.setAttribute("points", windows.map((w, i) => `${x(i)},${y(w.mean_score)}`).join(" "));
  Object.entries({fill: "none", stroke: "#1d2733", "stroke-width": 1.5}).forEach(([k, v]) => line.setAttribute(k, v));
  svg.appendChild(line);
  return svg;
}

function render(state) {
  document.getElementById("scored").textContent = state.scored_total;
  document.getElementById("rate").textContent = state.scored_per_second.toFixed(1);
  document.getElementById("lag").textContent = state.consumer_lag ?? "–";
  document.getElementById("dlq").textContent = state.dead_letters;
  document.getElementById("status").textContent = "live · " + new Date().toLocaleTimeString();
  const alertStarts = new Map();
  state.alerts.forEach((a) => {
    if (!alertStarts.has(a.ticker)) alertStarts.set(a.ticker, new Set());
    alertStarts.get(a.ticker).add(a.window.window_start.replace("Z", "+00:00"));
  });
  const tickers = document.getElementById("tickers");
  tickers.replaceChildren();
  for (const [ticker, windows] of Object.entries(state.tickers)) {
    const card = document.createElement("div");
    card.className = "card" + (alertStarts.has(ticker) ? " alerting" : "");
    card.dataset.ticker = ticker;
    const title = document.createElement("h2");
    const last = windows[windows.length - 1];
    const name = document.createElement("span"); name.appendChild(text(ticker));
    const score = document.createElement("span");
    score.style.color = last.mean_score < -0.2 ? "var(--neg)" : last.mean_score > 0.2 ? "var(--pos)" : "var(--mid)";
    score.appendChild(text(`${last.mean_score >= 0 ? "+" : ""}${last.mean_score.toFixed(2)} · ${windows.length} windows`));
    title.append(name, score);
    card.append(title, chart(windows, alertStarts.get(ticker) ?? new Set()));
    tickers.appendChild(card);
  }
  const alerts = document.getElementById("alerts");
  if (state.alerts.length) {
    alerts.replaceChildren();
    for (const a of state.alerts) {
      const box = document.createElement("div");
      box.className = "alert";
      box.dataset.ticker = a.ticker;
      const h = document.createElement("h3");
      h.appendChild(text(`${a.ticker}: ${(a.window.share_negative * 100).toFixed(0)}% negative`));
      const p = document.createElement("div");
      p.className = "muted";
      p.appendChild(text(`window ${a.window.window_start} · ${a.window.count} items · baseline ` +
        `${(a.baseline_share_negative * 100).toFixed(0)}% over ${a.baseline_windows} windows · z ${a.z_score.toFixed(1)}`));
      const list = document.createElement("ul");
      for (const e of a.window.top_negative) {
        const li = document.createElement("li");
        li.appendChild(text(`${e.headline} (${(e.negative_probability * 100).toFixed(0)}%, ${e.item_id})`));
        list.appendChild(li);
      }
      box.append(h, p, list);
      alerts.appendChild(box);
    }
  }
}

const source = new EventSource("/dashboard/events");
source.onmessage = (event) => render(JSON.parse(event.data));
source.onerror = () => { document.getElementById("status").textContent = "reconnecting…"; };
