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

// SEG overlays: each checkbox shows or hides its segmentation over the image.
document.querySelectorAll(".seg-toggle input").forEach((box) => {
  box.addEventListener("change", () => {
    document.querySelectorAll('img.overlay[data-result="' + box.dataset.result + '"]')
      .forEach((img) => { img.hidden = !box.checked; });
  });
});
