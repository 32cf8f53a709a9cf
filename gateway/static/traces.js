const COLOURS = ["#1f6feb", "#8250df", "#1a7f37", "#bf3989", "#9a6700", "#0969da", "#cf222e", "#57606a"];
const serviceColour = new Map();
function colourOf(service) {
  if (!serviceColour.has(service)) serviceColour.set(service, COLOURS[serviceColour.size % COLOURS.length]);
  return serviceColour.get(service);
}
function element(tag, attributes = {}, text = "") {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text) node.textContent = text;
  return node;
}
function showProblem(message) {
  const problem = document.getElementById("problem");
  problem.textContent = message;
  problem.hidden = !message;
}
async function fetchJson(url) {
  const reply = await fetch(url);
  const body = await reply.json();
  if (!reply.ok) throw new Error(body.detail || reply.statusText);
  return body;
}
async function loadList() {
  let traces;
  try { traces = await fetchJson("/traces/api/traces"); showProblem(""); }
  catch (error) { showProblem(error.message); return; }
  const body = document.querySelector("#list tbody");
  body.replaceChildren();
  for (const trace of traces) {
    const row = element("tr", {class: "trace", "data-trace-id": trace.trace_id});
    row.append(
      element("td", {}, new Date(trace.start_ns / 1e6).toLocaleTimeString()),
      element("td", {}, `${trace.root_service}: ${trace.root}`),
      element("td", {}, trace.services.join(", ")),
      element("td", {class: "num"}, String(trace.spans)),
      element("td", {class: "num"}, `${trace.duration_ms.toFixed(1)} ms`),
      element("td", {class: "num" + (trace.errors ? " error" : "")}, String(trace.errors)),
    );
    const id = element("td"); id.append(element("code", {}, trace.trace_id)); row.append(id);
    row.addEventListener("click", () => loadTrace(trace.trace_id));
    body.append(row);
  }
}
function depthOf(spans) {
  const byId = new Map(spans.map(span => [span.span_id, span]));
  const depth = new Map();
  const visit = span => {
    if (depth.has(span.span_id)) return depth.get(span.span_id);
    const parent = byId.get(span.parent_span_id);
    const value = parent && parent !== span ? visit(parent) + 1 : 0;
    depth.set(span.span_id, value);
    return value;
  };
  spans.forEach(visit);
  return depth;
}
function ordered(spans) {
  // Depth-first, children by start time, so each span sits under its parent.
  const ids = new Set(spans.map(span => span.span_id));
  const children = new Map();
  for (const span of spans) {
    const parent = ids.has(span.parent_span_id) ? span.parent_span_id : "";
    if (!children.has(parent)) children.set(parent, []);
    children.get(parent).push(span);
  }
  const out = [];
  const walk = parent => {
    for (const span of (children.get(parent) || []).sort((a, b) => a.start_ns - b.start_ns)) {
      out.push(span);
      walk(span.span_id);
    }
  };
  walk("");
  return out;
}
async function loadTrace(traceId) {
  let spans;
  try { spans = await fetchJson(`/traces/api/traces/${traceId}`); showProblem(""); }
  catch (error) { showProblem(error.message); return; }
  const start = Math.min(...spans.map(s => s.start_ns));
  const end = Math.max(...spans.map(s => s.start_ns + s.duration_ms * 1e6));
  const total = Math.max(1, end - start);
  const depth = depthOf(spans);
  document.getElementById("title").textContent = `trace ${traceId}: ${spans.length} spans, ${(total / 1e6).toFixed(1)} ms`;
  const waterfall = document.getElementById("waterfall");
  waterfall.replaceChildren();
  for (const span of ordered(spans)) {
    const row = element("div", {class: "row", "data-span-name": span.name});
    const name = element("div", {class: "name"});
    name.style.paddingLeft = `${depth.get(span.span_id) * 14}px`;
    const tag = element("span", {class: "service"}, span.service.replace(/^infermesh-/, ""));
    tag.style.background = colourOf(span.service);
    name.append(tag, document.createTextNode(span.name));
    name.title = `${span.service}: ${span.name}`;
    const lane = element("div", {class: "lane"});
    const bar = element("div", {class: "bar" + (span.status === "ERROR" ? " err" : "")});
    bar.style.left = `${((span.start_ns - start) / total) * 100}%`;
    bar.style.width = `${((span.duration_ms * 1e6) / total) * 100}%`;
    bar.style.background = colourOf(span.service);
    lane.append(bar);
    row.append(name, lane, element("div", {class: "num muted"}, `${span.duration_ms.toFixed(2)} ms`));
    row.addEventListener("click", () => {
      const open = row.querySelector(".details");
      if (open) { open.remove(); return; }
      const details = {kind: span.kind, status: span.status, status_message: span.status_message || undefined,
                       attributes: span.attributes, links: span.links.length ? span.links : undefined,
                       events: span.events.length ? span.events : undefined};
      row.append(element("div", {class: "details"}, JSON.stringify(details, null, 2)));
    });
    waterfall.append(row);
  }
  document.getElementById("trace").hidden = false;
  history.replaceState(null, "", `/traces?trace=${traceId}`);
}
document.getElementById("refresh").addEventListener("click", loadList);
loadList().then(() => {
  const wanted = new URLSearchParams(location.search).get("trace");
  if (wanted) loadTrace(wanted);
});
