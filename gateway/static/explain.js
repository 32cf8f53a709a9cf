const form = document.getElementById("form");
const headSelect = document.getElementById("head");

function sentiment(label) {
  return label === "negative" || label === "positive";
}

function colour(attribution, targetLabel, scale) {
  const strength = Math.min(1, Math.abs(attribution) / scale);
  const alpha = 0.15 + 0.75 * strength;
  if (!sentiment(targetLabel)) {
    // Any other head's label (a topic): blue supports it, grey counts against it.
    return attribution > 0 ? `rgba(21, 101, 192, ${alpha})` : `rgba(117, 117, 117, ${alpha})`;
  }
  // Attribution supports the target label; show the sentiment direction it pushes towards.
  const towardsNegative = targetLabel === "negative" ? attribution : -attribution;
  return towardsNegative > 0 ? `rgba(198, 40, 40, ${alpha})` : `rgba(46, 125, 50, ${alpha})`;
}

// The default model's heads, from GET /v1/models; a model listed without `heads` has one.
async function loadHeads() {
  try {
    const reply = await fetch("/v1/models");
    if (!reply.ok) return;
    const body = await reply.json();
    const model = (body.models || []).find((m) => m.name === body.default_model);
    const heads = model && Array.isArray(model.heads) ? model.heads : [];
    if (heads.length < 2) return;
    headSelect.replaceChildren(...heads.map((head) => {
      const option = document.createElement("option");
      option.value = head.name;
      option.textContent = `${head.name} (${head.activation === "sigmoid" ? "multi-label" : "one label"})`;
      return option;
    }));
    headSelect.hidden = false;
  } catch (ignored) {
    // Without the list the page explains the primary head, as before.
  }
}

function render(input, body) {
  const chunk = body.chunks[body.deciding_chunk];
  const head = body.head && !headSelect.hidden ? ` of ${body.head}` : "";
  document.getElementById("label").textContent = `${body.label} (explaining ${body.target_label}${head})`;
  document.getElementById("legend").textContent = sentiment(body.target_label)
    ? "Red words push towards negative, green words towards positive"
    : `Blue words support ${body.target_label}, grey words count against it`;
  document.getElementById("probabilities").textContent = Object.entries(body.probabilities)
    .map(([name, p]) => `${name} ${(p * 100).toFixed(1)}%`).join(" · ");
  document.getElementById("weights").textContent =
    `attributions computed on ${body.attribution_model}; label from the served ${body.served_variant} model`;
  const disagree = document.getElementById("disagree");
  disagree.hidden = !body.gradients_disagree;
  disagree.textContent = body.gradients_disagree
    ? `The ${body.attribution_model} weights the gradients ran on label this ${body.gradient_label}, not ${body.label}: read the colours with care.`
    : "";
  const scale = Math.max(1e-6, ...chunk.words.map((w) => Math.abs(w.attribution)));
  const out = document.getElementById("text");
  out.replaceChildren();
  let cursor = chunk.char_start;
  for (const word of chunk.words) {
    out.appendChild(document.createTextNode(input.slice(cursor, word.start)));
    const span = document.createElement("span");
    span.className = "word";
    span.textContent = word.text;
    span.dataset.attribution = word.attribution.toFixed(4);
    span.title = `attribution ${word.attribution.toFixed(3)}`;
    if (Math.abs(word.attribution) / scale > 0.05) span.style.background = colour(word.attribution, body.target_label, scale);
    out.appendChild(span);
    cursor = word.end;
  }
  out.appendChild(document.createTextNode(input.slice(cursor, chunk.char_end)));
  const rows = document.getElementById("faithfulness");
  rows.replaceChildren();
  for (const f of chunk.faithfulness) {
    const tr = document.createElement("tr");
    for (const value of [`${Math.round(f.top_percent * 100)}%`, f.comprehensiveness, f.random_comprehensiveness, f.sufficiency, f.random_sufficiency]) {
      const td = document.createElement("td");
      td.textContent = typeof value === "number" ? value.toFixed(3) : value;
      tr.appendChild(td);
    }
    rows.appendChild(tr);
  }
  document.getElementById("result").hidden = false;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = document.getElementById("input").value;
  const error = document.getElementById("error");
  error.hidden = true;
  const reply = await fetch("/v1/explain", {
    method: "POST",
    headers: {"content-type": "application/json"},
    body: JSON.stringify({text, method: document.getElementById("method").value, head: headSelect.value || ""}),
  });
  const body = await reply.json();
  if (!reply.ok) { error.textContent = `${body.title}: ${body.detail}`; error.hidden = false; return; }
  render(text, body);
});

loadHeads();
