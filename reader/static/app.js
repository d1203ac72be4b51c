// The page of reader.serve: asks POST /answer and shows the answer, its span in the cited passage,
// the passages read and the time per stage. "compare" asks btr, then baseline (one after the other,
// so that neither slows the other down). /?q=...&k=...&mode=... asks on load.
"use strict";

const form = document.getElementById("ask");
const statusLine = document.getElementById("status");
const results = document.getElementById("results");

async function ask(question, k, mode) {
  const response = await fetch("/answer", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ question, k, mode }),
  });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function timings(table, stages, scale) {
  for (const [stage, ms] of Object.entries(stages)) {
    if (stage === "batch") continue;  // a count, not a time
    const row = table.insertRow();
    row.className = stage;
    row.insertCell().textContent = stage;
    row.insertCell().textContent = `${ms.toFixed(1)} ms`;
    const bar = element("div", "bar");
    bar.style.width = `${(100 * ms) / scale}%`;
    row.insertCell().append(bar);
  }
}

function panel(result, scale) {
  const section = document.getElementById("panel").content.firstElementChild.cloneNode(true);
  section.dataset.mode = result.mode;
  section.querySelector(".mode").textContent = result.mode;
  section.querySelector(".total").textContent = `${result.timings_ms.total.toFixed(1)} ms`;
  section.querySelector(".answer").textContent = result.answer;
  if (result.context) {  // the cited passage; an extracted span is highlighted where the reader found it
    const { context, span } = result;  // a generated (FiD) answer has no span
    section.querySelector(".context").append(...(span
      ? [context.slice(0, span[0]), element("mark", "", context.slice(span[0], span[1])), context.slice(span[1])]
      : [context]));
  }
  timings(section.querySelector(".timings"), result.timings_ms, scale);
  result.passages.forEach((p, i) => {
    const item = element("li", i === result.source ? "cited" : "");
    item.append(element("strong", "title", p.title), element("span", "score", p.score.toFixed(3)));
    if (i === result.source) item.append(element("span", "tag", "cited"));
    item.append(element("span", "snippet", p.snippet));
    section.querySelector(".passages").append(item);
  });
  return section;
}

function summary(answers) {
  const ms = answers.map((a) => a.timings_ms.total);
  if (answers.length === 1) return `${answers[0].mode}: ${ms[0].toFixed(1)} ms`;
  return `btr ${ms[0].toFixed(1)} ms, baseline ${ms[1].toFixed(1)} ms (baseline / btr: ${(ms[1] / ms[0]).toFixed(2)})`;
}

async function run(question, k, mode) {
  document.body.dataset.state = "asking";
  statusLine.textContent = "asking ...";
  results.replaceChildren();
  try {
    const answers = [];
    for (const m of mode === "compare" ? ["btr", "baseline"] : [mode]) answers.push(await ask(question, k, m));
    const scale = Math.max(...answers.map((a) => a.timings_ms.total));
    results.replaceChildren(...answers.map((a) => panel(a, scale)));
    statusLine.textContent = summary(answers);
    document.body.dataset.state = "done";
  } catch (error) {
    statusLine.textContent = `error: ${error.message}`;
    document.body.dataset.state = "error";
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const params = new URLSearchParams(new FormData(form));
  history.replaceState(null, "", `?${params}`);  // a link that asks the same again
  run(params.get("q"), Number(params.get("k")), params.get("mode"));
});

const asked = new URLSearchParams(location.search);
for (const name of ["q", "k", "mode"]) if (asked.has(name)) form.elements[name].value = asked.get(name);
if (asked.get("q")) form.requestSubmit();
