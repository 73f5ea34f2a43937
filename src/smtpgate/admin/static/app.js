// smtpgate admin page: a little JavaScript, no build step, no external resources.
// Buttons carry what to do: data-method, data-url, optional data-body (JSON),
// data-confirm (question), data-show (element to show the answer in) or data-reload.
"use strict";

function show(el, text, isError) {
  if (!el) return;
  el.textContent = text;
  el.hidden = false;
  el.classList.toggle("error", !!isError);
}

function describe(data) {
  if (data === null || typeof data !== "object") return String(data);
  if (Array.isArray(data.answers)) return data.answers.join("; ") || "(no answer)";
  if (data.error) return data.error;
  if (data.reply) return data.reply;
  return JSON.stringify(data);
}

async function act(button) {
  const question = button.dataset.confirm;
  if (question && !window.confirm(question)) return;
  const target = button.dataset.show ? document.querySelector(button.dataset.show)
                                     : document.getElementById("notice");
  const init = { method: button.dataset.method || "POST", headers: {}, credentials: "same-origin" };
  if (button.dataset.body) {
    init.headers["Content-Type"] = "application/json";
    init.body = button.dataset.body;
  }
  button.disabled = true;
  try {
    const response = await fetch(button.dataset.url, init);
    let data;
    try { data = await response.json(); } catch (e) { data = { error: response.statusText }; }
    if (!response.ok) {
      show(target, (data && data.error) || ("HTTP " + response.status), true);
      return;
    }
    if (button.dataset.go) { window.location.assign(button.dataset.go); return; }
    if (button.hasAttribute("data-reload")) { window.location.reload(); return; }
    show(target, describe(data), false);
  } catch (e) {
    show(target, String(e), true);
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-url]");
  if (button) { event.preventDefault(); act(button); }
});

// Dashboard: rates from two readings of /metrics (per minute).
function sumMetric(text, name) {
  let total = 0, found = false;
  for (const line of text.split("\n")) {
    if (line.startsWith(name + "{") || line.startsWith(name + " ")) {
      const value = parseFloat(line.slice(line.lastIndexOf(" ") + 1));
      if (!Number.isNaN(value)) { total += value; found = true; }
    }
  }
  return found ? total : null;
}

async function pollRates() {
  const cells = document.querySelectorAll("[data-rate]");
  if (!cells.length) return;
  let previous = null;
  for (;;) {
    try {
      const response = await fetch("/metrics", { credentials: "same-origin" });
      const text = await response.text();
      const now = Date.now() / 1000;
      const reading = {};
      cells.forEach((cell) => { reading[cell.dataset.rate] = sumMetric(text, cell.dataset.rate); });
      if (previous) {
        cells.forEach((cell) => {
          const a = previous.values[cell.dataset.rate], b = reading[cell.dataset.rate];
          if (a !== null && b !== null && now > previous.time) {
            cell.textContent = ((b - a) * 60 / (now - previous.time)).toFixed(1) + " /min";
          }
        });
      }
      previous = { time: now, values: reading };
    } catch (e) { /* keep the last figures */ }
    await new Promise((resolve) => setTimeout(resolve, 5000));
  }
}

document.addEventListener("DOMContentLoaded", pollRates);
