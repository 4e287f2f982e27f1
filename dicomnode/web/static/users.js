// Users page (admins): every button is one call to /api/users/...; the page reloads after.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("page-data").textContent);
  const box = document.getElementById("message");

  async function call(method, url, body, done) {
    const headers = { "X-CSRF-Token": data.csrf || "" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(url, { method, headers, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body) });
    const json = await response.json().catch(() => ({}));
    box.className = "message " + (response.ok ? "ok" : "error");
    box.textContent = response.ok ? done : "Not changed: " + (typeof json.detail === "string" ? json.detail : response.statusText);
    if (response.ok) window.setTimeout(() => window.location.reload(), 800);
  }

  document.querySelectorAll("#users tr[data-name]").forEach((row) => {
    const name = row.dataset.name;
    const url = "/api/users/" + encodeURIComponent(name);
    const on = (selector, handler) => row.querySelectorAll(selector).forEach((el) => el.addEventListener(el.tagName === "SELECT" ? "change" : "click", () => handler(el)));
    on("select.role", (el) => call("PUT", url + "/role", { role: el.value }, name + " is now " + el.value + "."));
    on("button.disable", () => call("POST", url + "/disable", undefined, name + " disabled."));
    on("button.enable", () => call("POST", url + "/enable", undefined, name + " enabled."));
    on("button.unlock", () => call("POST", url + "/unlock", undefined, "Failed sign-ins of " + name + " cleared."));
    on("button.revoke", () => call("DELETE", url + "/tokens", undefined, "API tokens of " + name + " revoked."));
    on("button.revoke-one", (el) => call("DELETE", url + "/tokens/" + el.dataset.token, undefined, "Token " + el.dataset.token + " revoked."));
    on("button.passwd", () => call("POST", url + "/password", { password: row.querySelector("input.password").value }, "Password of " + name + " changed."));
    on("button.remove", () => {
      if (window.confirm("Remove user " + name + " with their API tokens?")) call("DELETE", url, undefined, name + " removed.");
    });
  });
})();
