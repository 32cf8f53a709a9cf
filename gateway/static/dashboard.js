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

const set = (node, attributes) => { Object.entries(attributes).forEach(([k, v]) => node.setAttribute(k, v)); return node; };
const svgEl = (name, attributes) => set(document.createElementNS(svgNS, name), attributes);
const pct = (share) => `${(share * 100).toFixed(0)}%`;
const norm = (start) => start.replace("Z", "+00:00");

// White-grey (no negative item) to dark red (all negative).
function negativeColour(share) {
  const low = [223, 229, 234], high = [183, 28, 28];
  const c = low.map((l, i) => Math.round(l + (high[i] - l) * Math.min(1, Math.max(0, share))));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function mixText(mix, limit) {
  return Object.entries(mix ?? {}).slice(0, limit).map(([name, count]) => `${name} ${count}`).join(" · ");
}

// One row per topic, one column per window: colour is the share of negative items,
// bar height the items (against the busiest window shown), outlined where a topic alerted.
function topicHeatmap(topics, alertStarts) {
  const starts = [...new Set(Object.values(topics).flatMap((ws) => ws.map((w) => w.start)))].sort().slice(-36);
  const names = Object.keys(topics).sort((a, b) =>
    topics[b].reduce((n, w) => n + w.count, 0) - topics[a].reduce((n, w) => n + w.count, 0) || a.localeCompare(b));
  const labelW = 170, latestW = 120, rowH = 22, top = 4;
  const cellW = Math.max(8, Math.min(22, Math.floor(560 / Math.max(starts.length, 1))));
  const width = labelW + starts.length * cellW + latestW, height = top + names.length * rowH + 18;
  const svg = svgEl("svg", {viewBox: `0 0 ${width} ${height}`, role: "img",
                            "aria-label": "Share of negative items and volume per topic over time"});
  svg.style.maxWidth = `${Math.round(width * 1.25)}px`;
  const column = new Map(starts.map((start, i) => [start, i]));
  const busiest = Math.max(1, ...Object.values(topics).flatMap((ws) => ws.filter((w) => column.has(w.start)).map((w) => w.count)));
  names.forEach((topic, row) => {
    const y = top + row * rowH;
    const alerted = alertStarts.get(topic) ?? new Set();
    const label = svgEl("text", {x: labelW - 8, y: y + rowH / 2 + 4, "text-anchor": "end"});
    if (alerted.size) label.setAttribute("class", "alerting");
    label.appendChild(text(topic));
    svg.appendChild(label);
    svg.appendChild(svgEl("line", {x1: labelW, x2: labelW + starts.length * cellW, y1: y + rowH - 2, y2: y + rowH - 2, stroke: "#eef1f4"}));
    for (const w of topics[topic]) {
      if (!column.has(w.start)) continue;
      const h = Math.max(3, Math.round((w.count / busiest) * (rowH - 4)));
      const cell = svgEl("rect", {x: labelW + column.get(w.start) * cellW + 1, y: y + rowH - 2 - h, width: cellW - 2, height: h,
                                  fill: negativeColour(w.share_negative), rx: 1});
      if (alerted.has(norm(w.start))) set(cell, {stroke: "#3e0000", "stroke-width": 1.5});
      const tip = svgEl("title", {});
      tip.appendChild(text(`${topic} · ${new Date(w.start).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"})} · ` +
        `${w.count} items, ${pct(w.share_negative)} negative` + (w.tickers && Object.keys(w.tickers).length ? ` · ${mixText(w.tickers, 3)}` : "")));
      cell.appendChild(tip);
      svg.appendChild(cell);
    }
    const last = topics[topic][topics[topic].length - 1];
    const latest = svgEl("text", {x: labelW + starts.length * cellW + 8, y: y + rowH / 2 + 4, class: "latest"});
    latest.appendChild(text(`${pct(last.share_negative)} neg · ${last.count}`));
    svg.appendChild(latest);
  });
  starts.forEach((start, i) => {
    if (i % 6 !== 0) return;
    const tick = svgEl("text", {x: labelW + i * cellW, y: height - 4, class: "axis"});
    tick.appendChild(text(new Date(start).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"})));
    svg.appendChild(tick);
  });
  return svg;
}

function alertBox(kind, name, a, details) {
  const box = document.createElement("div");
  box.className = `alert ${kind}`;
  box.dataset[kind] = name;
  const h = document.createElement("h3");
  const tag = document.createElement("span"); tag.className = "kind"; tag.appendChild(text(kind));
  h.append(tag, text(`${name}: ${pct(a.window.share_negative)} negative`));
  const p = document.createElement("div");
  p.className = "muted";
  p.appendChild(text(`window ${a.window.window_start} · ${a.window.count} items · baseline ` +
    `${pct(a.baseline_share_negative)} over ${a.baseline_windows} windows · z ${a.z_score.toFixed(1)}`));
  box.append(h, p);
  if (details) {
    const d = document.createElement("div"); d.className = "muted"; d.appendChild(text(details)); box.appendChild(d);
  }
  const list = document.createElement("ul");
  for (const e of a.window.top_negative) {
    const li = document.createElement("li");
    const who = e.tickers && e.tickers.length ? `${e.tickers.join(", ")}; ` : "";
    li.appendChild(text(`${e.headline} (${who}${pct(e.negative_probability)}, ${e.item_id})`));
    list.appendChild(li);
  }
  box.appendChild(list);
  return box;
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
    const mix = document.createElement("p");
    mix.className = "mix";
    mix.appendChild(text(Object.keys(last.topics ?? {}).length ? `topics: ${mixText(last.topics, 3)}` : "\u00a0"));
    card.append(title, mix, chart(windows, alertStarts.get(ticker) ?? new Set()));
    tickers.appendChild(card);
  }
  const topicAlertStarts = new Map();
  (state.topic_alerts ?? []).forEach((a) => {
    if (!topicAlertStarts.has(a.topic)) topicAlertStarts.set(a.topic, new Set());
    topicAlertStarts.get(a.topic).add(norm(a.window.window_start));
  });
  if (Object.keys(state.topics ?? {}).length) {
    document.getElementById("topics").replaceChildren(topicHeatmap(state.topics, topicAlertStarts));
  }
  if ((state.topic_alerts ?? []).length) {
    document.getElementById("topic-alerts").replaceChildren(...state.topic_alerts.map((a) => {
      const named = Object.keys(a.window.tickers).length ? `tickers: ${mixText(a.window.tickers, 3)}; ` : "";
      return alertBox("topic", a.topic, a, `${named}${a.window.without_ticker} of ${a.window.count} items name no ticker`);
    }));
  }
  if (state.alerts.length) {
    document.getElementById("alerts").replaceChildren(...state.alerts.map((a) => {
      const negatives = Object.entries(a.window.negative_topics ?? {});
      const total = negatives.reduce((n, [, c]) => n + c, 0);
      const why = negatives.length ? `mostly ${negatives[0][0]} (${negatives[0][1]} of ${total} negative items with a topic)` : "";
      return alertBox("ticker", a.ticker, a, why);
    }));
  }
}

const source = new EventSource("/dashboard/events");
source.onmessage = (event) => render(JSON.parse(event.data));
source.onerror = () => { document.getElementById("status").textContent = "reconnecting…"; };
