// Study page: retry a failed delivery through the API (admin only; the button exists only then).
"use strict";
document.querySelectorAll("button.retry").forEach((button) => {
  button.addEventListener("click", async () => {
    const response = await fetch("/api/deliveries/" + button.dataset.id + "/retry", {
      method: "POST", headers: { "X-CSRF-Token": button.dataset.csrf }, credentials: "same-origin",
    });
    const box = document.getElementById("message");
    const json = await response.json().catch(() => ({}));
    box.textContent = response.ok ? "Delivery queued again." : "Not retried: " + (json.detail || response.statusText);
    if (response.ok) window.setTimeout(() => window.location.reload(), 600);
  });
});

// Study page: encode a failed result set again (admin only; the button exists only then).
document.querySelectorAll("button.retry-results").forEach((button) => {
  button.addEventListener("click", async () => {
    const response = await fetch("/api/jobs/" + button.dataset.job + "/results/retry", {
      method: "POST", headers: { "X-CSRF-Token": button.dataset.csrf }, credentials: "same-origin",
    });
    const box = document.getElementById("message");
    const json = await response.json().catch(() => ({}));
    box.textContent = response.ok ? "Encoding queued again; the node picks it up at its next pass."
      : "Not retried: " + (json.detail || response.statusText);
    if (response.ok) window.setTimeout(() => window.location.reload(), 600);
  });
});

// SEG overlays: each checkbox shows or hides its segmentation over the image.
document.querySelectorAll(".seg-toggle input").forEach((box) => {
  box.addEventListener("change", () => {
    document.querySelectorAll('img.overlay[data-result="' + box.dataset.result + '"]')
      .forEach((img) => { img.hidden = !box.checked; });
  });
});

// Re-run the study (admin only): preset and switches -> POST /api/studies/{uid}/rerun.
const rerunButton = document.getElementById("rerun-button");
if (rerunButton) {
  rerunButton.addEventListener("click", async () => {
    const ids = (id) => document.getElementById(id).value.split(",").map((v) => v.trim()).filter((v) => v);
    const body = { preset: document.getElementById("rerun-preset").value,
      with: ids("rerun-with"), without: ids("rerun-without") };
    const response = await fetch("/api/studies/" + encodeURIComponent(rerunButton.dataset.study) + "/rerun", {
      method: "POST", credentials: "same-origin",
      headers: { "X-CSRF-Token": rerunButton.dataset.csrf, "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const box = document.getElementById("message");
    const json = await response.json().catch(() => ({}));
    box.className = "message " + (response.ok ? "ok" : "error");
    box.textContent = response.ok ? "Re-run queued as job " + json.job_id + "."
      : "Not re-run: " + (typeof json.detail === "string" ? json.detail : response.statusText);
    if (response.ok) window.setTimeout(() => window.location.reload(), 1500);
  });
}
