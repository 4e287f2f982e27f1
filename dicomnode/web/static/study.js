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
