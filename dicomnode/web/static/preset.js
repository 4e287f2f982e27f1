// Preset editor: toggles -> POST /api/resolve -> toggles, graph and "added" list redrawn.
// Saves go through the REST API with the session's CSRF token (no second write path).
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("page-data").textContent);
  const preset = data.preset;
  const base = preset.models.slice();             // refs as the preset lists them
  const baseIds = base.map((r) => r.split("@")[0]);
  const optionalIds = (preset.optional_models || []).map((r) => r.split("@")[0]);
  const sel = { with: [], without: [] };
  let graph = null;
  const $ = (id) => document.getElementById(id);
  const modality = $("modality");
  if (preset.routing && preset.routing.modality && preset.routing.modality.length) {
    modality.value = preset.routing.modality[0];
  }

  function message(text, kind) {
    const box = $("message");
    box.textContent = text;
    box.className = "message " + (kind || "");
  }

  async function api(method, url, body, extra) {
    const headers = Object.assign({ "X-CSRF-Token": data.csrf || "" }, extra || {});
    let payload = body;
    if (body !== undefined && !(body instanceof FormData)) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(body);
    }
    const response = await fetch(url, { method, headers, body: payload, credentials: "same-origin" });
    let json = null;
    try { json = await response.json(); } catch (e) { json = { detail: response.statusText }; }
    return { status: response.status, ok: response.ok, json };
  }

  function describe(json) {
    if (json.problems) return json.problems.map((p) => (p.field ? p.field + ": " : "") + p.message).join("; ");
    return typeof json.detail === "string" ? json.detail : JSON.stringify(json.detail);
  }

  async function refresh() {
    const res = await api("POST", "/api/resolve", {
      models: base, with: sel.with, without: sel.without, modality: modality.value,
    });
    if (!res.ok) {
      message("This selection does not resolve: " + describe(res.json), "error");
      if (res.json.choices) renderToggles(res.json.choices, null);
      return false;
    }
    graph = res.json;
    renderToggles(graph.choices, graph);
    renderGraph(graph);
    renderAdded(graph);
    return true;
  }

  function remove(list, id) { const i = list.indexOf(id); if (i >= 0) list.splice(i, 1); }

  async function toggle(id, on) {
    const before = { with: sel.with.slice(), without: sel.without.slice() };
    if (on) {
      remove(sel.without, id);
      if (!baseIds.includes(id) && !sel.with.includes(id)) sel.with.push(id);
    } else {
      if (sel.with.includes(id)) remove(sel.with, id);
      else if (!sel.without.includes(id)) sel.without.push(id);
    }
    message("");
    if (!(await refresh())) { sel.with = before.with; sel.without = before.without; await refresh(); }
  }

  function renderToggles(choices, g) {
    const list = $("toggles");
    list.innerHTML = "";
    const inGraph = g ? g.models : {};
    const removed = g ? g.removed : {};
    Object.keys(choices).sort().forEach((id) => {
      const choice = choices[id];
      const model = data.models[id] || {};
      const on = id in inGraph;
      let reason = choice.reason;
      let disabled = !on && !choice.ok;
      if (!on && removed[id] && removed[id] !== "switched off") {
        // Needs a model that is switched off: switch that one on first.
        reason = removed[id];
        disabled = true;
      } else if (!on && removed[id] && choice.ok) {
        reason = "switched off";
      } else if (!on && optionalIds.includes(id) && choice.ok) {
        reason = "optional in this preset; " + reason;
      }
      const li = document.createElement("li");
      li.className = "toggle state-" + (on ? choice.state : (disabled ? "unavailable" : "off"));
      li.id = "toggle-" + id;
      li.dataset.state = on ? choice.state : (disabled ? "unavailable" : "off");
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.checked = on;
      box.disabled = disabled;
      box.dataset.model = id;
      box.addEventListener("change", () => toggle(id, box.checked));
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = (model.name || id) + " ";
      const mid = document.createElement("span");
      mid.className = "mono small";
      mid.textContent = on ? id + "@" + inGraph[id] : id;
      const why = document.createElement("span");
      why.className = "reason";
      why.textContent = on && choice.state === "selected" ? "selected" : reason;
      label.append(box, name, mid);
      if (model.measured === false) {
        // No efficacy figures in its manifest: say so wherever it can be chosen.
        const badge = document.createElement("span");
        badge.className = "badge not-measured";
        badge.textContent = "not measured";
        label.append(" ", badge);
      }
      li.append(label, why);
      list.append(li);
    });
  }

  function renderAdded(g) {
    const list = $("added");
    list.innerHTML = "";
    Object.entries(g.added).forEach(([id, why]) => {
      const li = document.createElement("li");
      li.textContent = id + ": " + why;
      list.append(li);
    });
    Object.entries(g.removed).forEach(([id, why]) => {
      const li = document.createElement("li");
      li.className = "removed";
      li.textContent = id + ": " + why;
      list.append(li);
    });
  }

  const NS = "http://www.w3.org/2000/svg";
  function el(name, attrs, text) {
    const node = document.createElementNS(NS, name);
    Object.entries(attrs).forEach(([k, v]) => node.setAttribute(k, v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function renderGraph(g) {
    const svg = $("graph");
    svg.innerHTML = "";
    const W = 230, H = 46, GX = 64, GY = 22, PAD = 16;
    const pos = {};
    let rows = 0;
    g.stages.forEach((stage, s) => {
      stage.forEach((id, r) => { pos[id] = { x: PAD + s * (W + GX), y: PAD + 34 + r * (H + GY) }; });
      rows = Math.max(rows, stage.length);
    });
    const width = PAD * 2 + g.stages.length * (W + GX) - GX;
    const height = PAD * 2 + 34 + rows * (H + GY) - GY;
    if (!g.stages.length) {
      svg.setAttribute("width", 420);
      svg.setAttribute("height", 60);
      svg.append(el("text", { x: PAD, y: 36, class: "stage-label" }, "Nothing selected: switch a model on."));
      return;
    }
    svg.setAttribute("width", Math.max(width, 200));
    svg.setAttribute("height", Math.max(height, 80));
    svg.setAttribute("viewBox", "0 0 " + Math.max(width, 200) + " " + Math.max(height, 80));
    const defs = el("defs", {});
    const marker = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "9", refY: "5",
      markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" });
    marker.append(el("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#44546a" }));
    defs.append(marker);
    svg.append(defs);
    g.stages.forEach((stage, s) => {
      svg.append(el("text", { x: PAD + s * (W + GX), y: PAD + 8, class: "stage-label" }, "Stage " + (s + 1)));
    });
    g.edges.forEach((e) => {
      const a = pos[e.from], b = pos[e.to];
      if (!a || !b) return;
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
      const mx = (x1 + x2) / 2;
      // An edge that skips a stage bends over the boxes between instead of through them.
      const skips = Math.round((b.x - a.x) / (W + GX)) > 1;
      const top = PAD + 22;
      const d = skips
        ? `M ${x1} ${y1} C ${x1 + GX} ${top - 30}, ${x2 - GX} ${top - 30}, ${x2 - 2} ${y2}`
        : `M ${x1} ${y1} C ${mx} ${y1}, ${mx} ${y2}, ${x2 - 2} ${y2}`;
      svg.append(el("path", {
        d,
        class: "edge edge-" + e.kind, "marker-end": "url(#arrow)",
        "data-from": e.from, "data-to": e.to,
      }));
    });
    Object.entries(pos).forEach(([id, p]) => {
      const added = id in g.added;
      const group = el("g", { class: "node " + (added ? "added" : "selected"), "data-model": id });
      group.append(el("rect", { x: p.x, y: p.y, width: W, height: H, rx: 8 }));
      group.append(el("text", { x: p.x + 10, y: p.y + 19, class: "node-id" }, id));
      let sub = "v" + g.models[id] + (added ? " · " + g.added[id] : "");
      if (sub.length > 38) sub = sub.slice(0, 37) + "…";  // the full reason is in the tooltip
      group.append(el("text", { x: p.x + 10, y: p.y + 36, class: "node-sub" }, sub));
      const title = el("title", {}, id + "@" + g.models[id] + (added ? " (" + g.added[id] + ")" : ""));
      group.append(title);
      svg.append(group);
    });
  }

  modality.addEventListener("change", () => refresh());

  // ---- saving (admin only: the controls exist only for admins) ----
  const split = (text) => text.split(",").map((v) => v.trim()).filter((v) => v);

  function routingFromForm() {
    const routing = {};
    document.querySelectorAll(".routing-field").forEach((input) => {
      const values = split(input.value);
      if (values.length) routing[input.dataset.key] = values;
    });
    const tags = [];
    $("r-tags").value.split("\n").map((l) => l.trim()).filter((l) => l).forEach((line) => {
      const m = line.match(/^(\S+)\s*(~?=)\s*(.*)$/);
      if (m) tags.push({ tag: m[1], regex: m[3], ignore_case: m[2] === "~=" });
      else tags.push({ tag: line, regex: "" });  // the validator says what is wrong
    });
    if (tags.length) routing.tags = tags;
    return routing;
  }

  function presetFromForm(id) {
    // Every model of the graph shown (requirements and alternatives included), so that the
    // saved preset resolves to exactly this graph (the server's `combination`).
    const refs = graph ? graph.combination : base.slice();
    const chosen = refs.map((r) => r.split("@")[0]);
    const optional = (preset.optional_models || []).filter((r) => !chosen.includes(r.split("@")[0]));
    const body = {
      id, name: $("f-name").value, audience: $("f-audience").value,
      description: $("f-description").value, models: refs, optional_models: optional,
      outputs: { sr: $("f-sr").checked, seg: $("f-seg").checked, overlay: $("f-overlay").checked },
      destinations: split($("f-destinations").value), routing: routingFromForm(),
      priority: parseInt($("f-priority").value || "0", 10), enabled: $("f-enabled").checked,
    };
    if (preset.completeness && Object.keys(preset.completeness).length) {
      const c = {};
      Object.entries(preset.completeness).forEach(([k, v]) => { if (v !== null) c[k] = v; });
      if (Object.keys(c).length) body.completeness = c;
    }
    return body;
  }

  async function save(method, url, id, after) {
    // If-Match: a preset someone else saved since this page loaded is not overwritten.
    const extra = method === "PUT" && preset.etag ? { "If-Match": preset.etag } : {};
    const res = await api(method, url, presetFromForm(id), extra);
    if (res.ok) {
      if (method === "PUT") preset.etag = res.json.etag;
      message((method === "POST" ? "Created " : "Saved ") + res.json.file + " (revision " + res.json.revision + ").", "ok");
      if (after) window.location.assign(after);
    } else {
      message("Not saved: " + describe(res.json), "error");
    }
  }

  if ($("save")) $("save").addEventListener("click", () =>
    save("PUT", "/api/presets/" + encodeURIComponent(preset.id), preset.id, null));
  if ($("save-new")) $("save-new").addEventListener("click", () => {
    const id = ($("f-id") && !$("f-id").disabled ? $("f-id").value : $("new-id").value).trim();
    save("POST", "/api/presets", id, "/presets/" + encodeURIComponent(id));
  });
  if ($("f-id") && !$("f-id").disabled) $("f-id").addEventListener("input", () => { $("new-id").value = $("f-id").value; });
  if ($("validate")) $("validate").addEventListener("click", async () => {
    const id = data.is_new ? $("new-id").value.trim() : preset.id;
    const res = await api("POST", "/api/presets/validate", presetFromForm(id));
    message(res.ok ? "The preset is valid." : "Problems: " + describe(res.json), res.ok ? "ok" : "error");
  });
  if ($("delete")) $("delete").addEventListener("click", async () => {
    if (!window.confirm("Delete preset " + preset.id + "? Its content is kept in the audit trail.")) return;
    const res = await api("DELETE", "/api/presets/" + encodeURIComponent(preset.id));
    if (res.ok) window.location.assign("/presets");
    else message("Not deleted: " + describe(res.json), "error");
  });

  // ---- routing tester ----
  $("t-run").addEventListener("click", async () => {
    const form = new FormData();
    const files = $("t-files").files;
    for (const f of files) form.append("files", f);
    if ($("t-calling").value.trim()) form.append("calling_ae", $("t-calling").value.trim());
    if ($("t-study").value.trim()) form.append("study_uid", $("t-study").value.trim());
    if (data.admin && $("f-name")) {
      const id = data.is_new ? $("new-id").value.trim() : preset.id;
      form.append("draft", JSON.stringify(presetFromForm(id)));
    }
    const res = await api("POST", "/api/route-test", form);
    const out = $("t-result");
    out.innerHTML = "";
    if (!res.ok) { out.textContent = "Cannot test: " + describe(res.json); out.className = "error"; return; }
    out.className = "";
    const head = document.createElement("p");
    head.id = "t-chosen";
    head.textContent = res.json.preset ? "Chosen: " + res.json.preset + " (" + res.json.reason + ")" : "Not routed: " + res.json.reason;
    out.append(head);
    const table = document.createElement("table");
    table.className = "list";
    table.innerHTML = "<tr><th>Preset</th><th>Matched</th><th>Conditions</th></tr>";
    res.json.explanations.forEach((e) => {
      const tr = document.createElement("tr");
      const cells = [e.preset + (e.enabled ? "" : " (disabled)"), e.matched ? "yes" : "no",
        e.conditions.map((c) => (c.held ? "✔ " : "✘ ") + c.condition + " " + JSON.stringify(c.expected) + " seen " + JSON.stringify(c.seen)).join("\n") || e.note];
      cells.forEach((text) => { const td = document.createElement("td"); td.textContent = text; td.style.whiteSpace = "pre-line"; tr.append(td); });
      table.append(tr);
    });
    out.append(table);
  });

  refresh();
})();
