/* medfocus viewer: vanilla JS, no network. Data strings reach the page only through textContent. */
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("medfocus-data").textContent);
  var LUT = D.lut;
  var app = document.getElementById("app");
  while (app.firstChild) app.removeChild(app.firstChild);

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function bytes(b64) {
    var s = atob(b64), a = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) a[i] = s.charCodeAt(i);
    return a;
  }
  function fmt(x, d) {
    if (x === null || x === undefined || !isFinite(x)) return "–";
    var a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e4)) return x.toExponential(2);
    return x.toFixed(d === undefined ? 3 : d);
  }
  // ---- bitmaps ---------------------------------------------------------------------------------------
  var cache = typeof WeakMap === "function" ? new WeakMap() : null;
  function filmCanvas(f) {
    if (cache && cache.has(f)) return cache.get(f);
    var c = document.createElement("canvas"); c.width = f.w; c.height = f.h;
    var ctx = c.getContext("2d"), img = ctx.createImageData(f.w, f.h), px = bytes(f.data);
    for (var i = 0; i < px.length; i++) { var v = px[i]; img.data[4 * i] = v; img.data[4 * i + 1] = v; img.data[4 * i + 2] = v; img.data[4 * i + 3] = 255; }
    ctx.putImageData(img, 0, 0);
    if (cache) cache.set(f, c);
    return c;
  }
  function mapCanvas(m) { // colour map, alpha grows with the value so cold regions leave the film visible
    if (cache && cache.has(m)) return cache.get(m);
    var c = document.createElement("canvas"); c.width = m.w; c.height = m.h;
    var ctx = c.getContext("2d"), img = ctx.createImageData(m.w, m.h), px = bytes(m.data);
    for (var i = 0; i < px.length; i++) {
      var v = px[i];
      img.data[4 * i] = LUT[3 * v]; img.data[4 * i + 1] = LUT[3 * v + 1]; img.data[4 * i + 2] = LUT[3 * v + 2];
      img.data[4 * i + 3] = v;
    }
    ctx.putImageData(img, 0, 0);
    if (cache) cache.set(m, c);
    return c;
  }
  function maskCanvas(m) {
    if (cache && cache.has(m)) return cache.get(m);
    var c = document.createElement("canvas"); c.width = m.w; c.height = m.h;
    var ctx = c.getContext("2d"), img = ctx.createImageData(m.w, m.h), px = bytes(m.data);
    for (var i = 0; i < px.length; i++) {
      var on = px[i] >= 128;
      img.data[4 * i] = 0; img.data[4 * i + 1] = 229; img.data[4 * i + 2] = 255; img.data[4 * i + 3] = on ? 90 : 0;
    }
    ctx.putImageData(img, 0, 0);
    if (cache) cache.set(m, c);
    return c;
  }
  // ---- which map a method shows for a token ----------------------------------------------------------
  // A token as a reader names it: 1-based position, count and its text ("token 12/40 “effusion”").
  function tokenName(s, t) {
    var w = s.tokens && s.tokens[t] !== undefined && s.tokens[t] !== null ? String(s.tokens[t]).trim() : "";
    return "token " + (t + 1) + (s.tokens ? "/" + s.tokens.length : "") + (w ? " \u201c" + w + "\u201d" : "");
  }
  // kind: a stable state key (data-state); label: what the captions show
  function pickMap(s, m, t) {
    if (m.error) return { map: null, kind: "failed", label: "failed" };
    if (t === null || t === undefined) return { map: m.map, kind: "whole answer", label: "whole answer" };
    if (m.token_maps && m.token_maps[t]) return { map: m.token_maps[t], kind: "token " + t, label: (t === s.final_token_index ? "final " : "") + tokenName(s, t) };
    if (m.final_map && t === s.final_token_index) return { map: m.final_map, kind: "final token", label: "final " + tokenName(s, t) };
    return { map: m.map, kind: "whole answer (no per-token map)", label: "whole answer (no per-token map for " + tokenName(s, t) + ")" };
  }
  function drawBoxes(ctx, boxes, sx, sy, color, dash, width) {
    ctx.save(); ctx.strokeStyle = color; ctx.lineWidth = width; ctx.setLineDash(dash);
    for (var i = 0; i < boxes.length; i++) {
      var b = boxes[i];
      ctx.strokeRect(b[0] * sx, b[1] * sy, (b[2] - b[0]) * sx, (b[3] - b[1]) * sy);
    }
    ctx.restore();
  }
  function render(canvas, s, m, t, opt) {
    var f = s.film, W = opt.w || f.w, H = Math.round(W * f.h / f.w);
    if (canvas.width !== W) canvas.width = W;
    if (canvas.height !== H) canvas.height = H;
    var ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(filmCanvas(f), 0, 0, W, H);
    var pick = pickMap(s, m, t);
    if (pick.map) {
      ctx.save(); ctx.globalAlpha = opt.opacity; ctx.drawImage(mapCanvas(pick.map), 0, 0, W, H); ctx.restore();
    }
    var sx = W / s.image_size[0], sy = H / s.image_size[1], lw = Math.max(1.5, W / 300);
    var mf = m.medfocus;
    if (mf && opt.concept) { // a bilateral union shows both sides
      var parts = (D.unions && D.unions[opt.concept]) || [opt.concept];
      parts.forEach(function (c) {
        if (mf.masks && mf.masks[c]) ctx.drawImage(maskCanvas(mf.masks[c]), 0, 0, W, H);
        if (mf.concept_boxes[c]) drawBoxes(ctx, [mf.concept_boxes[c]], sx, sy, "#00e5ff", [2, 2], lw);
      });
    }
    if (opt.showPred) {
      var pb = m.pred_boxes.length ? m.pred_boxes : m.heatmap_boxes;
      drawBoxes(ctx, pb, sx, sy, "#ff1744", [6, 4], lw);
    }
    if (opt.showGT) drawBoxes(ctx, s.gt_boxes, sx, sy, "#00e676", [], lw);
    if (opt.markers) {
      ctx.save(); ctx.fillStyle = "#ffffff"; ctx.font = "bold " + Math.round(W / 28) + "px sans-serif";
      ctx.textBaseline = "top"; ctx.fillText(s.markers[0], W * 0.02, H * 0.02);  // from the film's orientation
      ctx.textAlign = "right"; ctx.fillText(s.markers[1], W * 0.98, H * 0.02); ctx.restore();
    }
    if (m.error && opt.label) {
      ctx.save(); ctx.fillStyle = "rgba(183,28,28,0.8)"; ctx.fillRect(0, H / 2 - 14, W, 28);
      ctx.fillStyle = "#fff"; ctx.font = "bold 14px sans-serif"; ctx.textAlign = "center"; ctx.textBaseline = "middle";
      ctx.fillText("failed", W / 2, H / 2); ctx.restore();
    }
    canvas.setAttribute("data-state", m.name + "|" + (t === null || t === undefined ? "all" : t) + "|" + pick.kind);
    return pick;
  }
  function colourBar(container, map, units) {
    while (container.firstChild) container.removeChild(container.firstChild);
    if (!map) { container.appendChild(el("span", "meta", "no map")); return; }
    var c = document.createElement("canvas"); c.width = 256; c.height = 1;
    var ctx = c.getContext("2d"), img = ctx.createImageData(256, 1);
    for (var i = 0; i < 256; i++) { img.data[4 * i] = LUT[3 * i]; img.data[4 * i + 1] = LUT[3 * i + 1]; img.data[4 * i + 2] = LUT[3 * i + 2]; img.data[4 * i + 3] = 255; }
    ctx.putImageData(img, 0, 0);
    container.appendChild(el("span", null, fmt(map.lo)));
    container.appendChild(c);
    container.appendChild(el("span", null, fmt(map.hi)));
    if (units) container.appendChild(el("span", "meta", units));
    if (map.hi <= map.lo) container.appendChild(el("span", "meta", "(constant map)"));
    if (map.nonfinite) container.appendChild(el("span", "meta", "(" + map.nonfinite + " non-finite pixels shown as the minimum)"));
  }

  // ---- page header -----------------------------------------------------------------------------------
  var notes = el("ul", "notes");
  (D.notes || []).forEach(function (n) { notes.appendChild(el("li", "note", n)); });
  if (notes.childNodes.length) app.appendChild(notes);

  D.samples.forEach(function (s, si) { app.appendChild(filmSection(s, si)); });
  if (D.citation) app.appendChild(el("footer", null, D.citation));

  function filmSection(s, si) {
    var sec = el("section", "film"); sec.id = "film-" + si;
    var okMethods = s.methods.filter(function (m) { return !m.error; });
    var start = okMethods.filter(function (m) { return m.name === "medfocus"; })[0] || okMethods[0] || s.methods[0];
    var st = { method: start ? start.name : null, sel: null, hover: null, opacity: 0.6, showPred: true, showGT: true, concept: null, hoverConcept: null };
    function M() { for (var i = 0; i < s.methods.length; i++) if (s.methods[i].name === st.method) return s.methods[i]; return null; }
    function tok() { return st.hover !== null ? st.hover : st.sel; }

    sec.appendChild(el("h2", null, s.label));
    var qa = el("div", "qa");
    function line(k, v) { if (v === null || v === undefined || v === "") return; var p = el("div"); p.appendChild(el("b", null, k + ": ")); p.appendChild(document.createTextNode(String(v))); qa.appendChild(p); }
    line("Question", s.question);
    var src = { model: "the model's own greedy answer", given: "given by the user", split: "the model's answer recorded by the benchmark split", split_other_model: "another model's answer recorded by the benchmark split (--relabel-split-model), not this model's own", ground_truth: "the ground truth (not the model's answer)" }[s.answer_source] || s.answer_source;
    line("Answer explained", s.answer);
    line("Answer source", src);
    line("Read as", s.answer_parsed === null ? "neither yes nor no" : s.answer_parsed);
    if (s.gt_answer !== null && s.gt_answer !== undefined) line("Ground truth", s.gt_answer);
    var meta = el("div", "meta", "model " + s.model + " · mode " + s.mode + " · " + s.image_size[0] + "×" + s.image_size[1] + " px · " + s.image_path);
    qa.appendChild(meta);
    sec.appendChild(qa);
    (s.warnings || []).forEach(function (w) { sec.appendChild(el("div", "note warn", "Warning: " + w)); });

    var lay = el("div", "layout"); sec.appendChild(lay);
    var left = el("div"), right = el("div"); lay.appendChild(left); lay.appendChild(right);

    // method switcher
    var sw = el("div", "methods");
    var btns = {};
    s.methods.forEach(function (m) {
      var b = el("button", "method-btn" + (m.error ? " failed" : ""), m.name);
      b.setAttribute("data-method", m.name); b.type = "button";
      if (m.error) b.title = m.error;
      b.addEventListener("click", function () { st.method = m.name; st.concept = null; update(); });
      btns[m.name] = b; sw.appendChild(b);
    });
    left.appendChild(sw);
    var main = el("canvas", "main-canvas"); main.setAttribute("role", "img"); main.setAttribute("aria-label", "film with the selected method's map");
    var wrap = el("div", "main-wrap"); wrap.appendChild(main); left.appendChild(wrap);
    var cap = el("div", "caption"); left.appendChild(cap);
    var cbar = el("div", "cbar"); left.appendChild(cbar);
    var ctl = el("div", "controls"); left.appendChild(ctl);
    var lab = el("label", null, "overlay opacity "); var rng = el("input", "opacity"); rng.type = "range"; rng.min = "0"; rng.max = "100"; rng.value = "60";
    rng.addEventListener("input", function () { st.opacity = Number(rng.value) / 100; update(); }); lab.appendChild(rng); ctl.appendChild(lab);
    function check(text, key, cls) {
      var l = el("label"), c = el("input", cls); c.type = "checkbox"; c.checked = st[key];
      c.addEventListener("change", function () { st[key] = c.checked; update(); });
      l.appendChild(c); l.appendChild(document.createTextNode(" " + text)); ctl.appendChild(l);
    }
    check("predicted boxes", "showPred", "show-pred");
    if (s.gt_boxes.length) check("expert boxes", "showGT", "show-gt");
    var leg = el("div", "legend");
    function legend(color, dash, text) { var sp = el("span"); var sw2 = el("span", "sw"); sw2.style.borderTop = "3px " + (dash ? "dashed " : "solid ") + color; sp.appendChild(sw2); sp.appendChild(document.createTextNode(text)); leg.appendChild(sp); }
    if (s.gt_boxes.length) legend("#00e676", false, "expert box");
    legend("#ff1744", true, "predicted box");
    legend("#00e5ff", true, "MedFocus concept (box + mask)");
    leg.appendChild(el("span", "meta", "R / L: the patient's right / left; " + s.orientation));
    left.appendChild(leg);

    // tokens
    right.appendChild(el("h3", null, "Answer tokens (hover or click: that token's map)"));
    var tbar = el("div", "controls");
    var allBtn = el("button", "all-tokens on", "whole answer"); allBtn.type = "button";
    allBtn.addEventListener("click", function () { st.sel = null; update(); });
    tbar.appendChild(allBtn); right.appendChild(tbar);
    var tokBox = el("div", "tokens"); right.appendChild(tokBox);
    var tokSpans = [];
    if (s.tokens && s.tokens.length) {
      s.tokens.forEach(function (t, i) {
        var sp = el("span", "token" + (i === s.final_token_index ? " final" : ""), t);
        sp.setAttribute("data-t", String(i));
        sp.title = tokenName(s, i) + (i === s.final_token_index ? " (final yes/no token)" : "");
        sp.addEventListener("mouseenter", function () { st.hover = i; update(); });
        sp.addEventListener("mouseleave", function () { st.hover = null; update(); });
        sp.addEventListener("click", function () { st.sel = i; st.hover = null; update(); });
        tokSpans.push(sp); tokBox.appendChild(sp);
      });
    }
    // no method of this film recorded answer tokens: the strip says why, for the method shown (update())
    var tokNote = (s.tokens && s.tokens.length) ? null : el("span", "meta token-note", "");
    if (tokNote) tokBox.appendChild(tokNote);
    right.appendChild(el("div", "meta", "Highlighted: the final yes/no token. Methods without per-token maps show their whole-answer map (gradient methods: also the final token's map)."));

    var mfBox = el("div", "medfocus"); right.appendChild(mfBox);
    right.appendChild(el("h3", null, "Cost per method"));
    var cost = el("table", "cost"); right.appendChild(cost);
    var hr = el("tr"); ["method", "forward", "backward", "seconds", "status"].forEach(function (h) { hr.appendChild(el("th", null, h)); });
    cost.appendChild(hr);
    s.methods.forEach(function (m) {
      var r = el("tr");
      r.appendChild(el("td", null, m.name)); r.appendChild(el("td", null, m.error ? "–" : m.n_forward));
      r.appendChild(el("td", null, m.error ? "–" : m.n_backward)); r.appendChild(el("td", null, m.error ? "–" : fmt(m.seconds, 2)));
      r.appendChild(el("td", m.error ? "err" : null, m.error ? "failed: " + m.error : "ok"));
      cost.appendChild(r);
    });

    // small multiples
    sec.appendChild(el("h3", null, "All methods (same token selection; click to select)"));
    var grid = el("div", "grid"); sec.appendChild(grid);
    var cells = [];
    s.methods.forEach(function (m) {
      var c = el("div", "cell thumb"); c.setAttribute("data-method", m.name);
      var cv = el("canvas"); c.appendChild(cv);
      c.appendChild(el("div", "lab", m.name));
      var sub = el("div", "sub"); c.appendChild(sub);
      c.addEventListener("click", function () { st.method = m.name; st.concept = null; update(); });
      grid.appendChild(c); cells.push({ m: m, div: c, canvas: cv, sub: sub });
    });
    if (D.citation) sec.appendChild(el("div", "cite", D.citation));

    function medfocusPanel(m, t) {
      while (mfBox.firstChild) mfBox.removeChild(mfBox.firstChild);
      var mf = m && m.medfocus;
      if (!mf) return;
      mfBox.appendChild(el("h3", null, t === null ? "MedFocus: drop in log-probability when each concept is hidden (nats)" : "MedFocus: drop for " + tokenName(s, t) + " (nats)"));
      var win = el("div", "caption");
      win.appendChild(el("b", null, "Winner: " + (mf.fallback ? "whole image (fallback fired)" : mf.winner)));
      var maxd = Math.max.apply(null, mf.deltas.concat([0]));
      var thr = mf.tau ? -Math.log(mf.tau) : null;
      win.appendChild(document.createTextNode(" · max δ = " + fmt(maxd) + " nats" + (thr !== null ? "; whole-image fallback when max δ ≤ −ln τ = " + fmt(thr) + " (τ = " + mf.tau + ")" : "") +
        (mf.region ? " · region " + mf.region : "") + (mf.rule ? " · rule " + mf.rule : "") + (mf.refine ? " · refine " + mf.refine : "") +
        (mf.reference_id ? " · reference " + mf.reference_id : "")));
      mfBox.appendChild(win);
      var vals = mf.deltas;
      if (t !== null && mf.token_deltas) vals = mf.token_deltas.map(function (row) { return row[t]; });
      var top = Math.max.apply(null, vals.map(function (v) { return Math.abs(v); }).concat([1e-12]));
      var order = vals.map(function (v, i) { return i; }).sort(function (a, b) { return vals[b] - vals[a]; });
      var tb = el("table", "bars");
      order.forEach(function (i) {
        var name = mf.variants[i];
        var tr = el("tr", (name === mf.winner && !mf.fallback ? "win" : "") + (name === st.concept ? " hl" : ""));
        tr.setAttribute("data-concept", name);
        tr.appendChild(el("td", "name", name));
        var td = el("td", "bar"), fill = el("span", "fill"); fill.style.width = (100 * Math.max(0, vals[i]) / top).toFixed(1) + "%";
        td.appendChild(fill); tr.appendChild(td);
        tr.appendChild(el("td", null, fmt(vals[i])));
        tr.addEventListener("click", function () { st.concept = st.concept === name ? null : name; update(); });
        tb.appendChild(tr);
      });
      mfBox.appendChild(tb);
      mfBox.appendChild(el("div", "meta", "Click a concept to draw its transferred box and mask on the film." + (mf.nested_checks.length ? " Nested-rule checks: " + mf.nested_checks.length + "." : "")));
    }

    function update() {
      var m = M(); if (!m) return;
      var t = tok();
      if (tokNote) tokNote.textContent = m.token_note || "no answer tokens recorded";
      Object.keys(btns).forEach(function (k) { btns[k].classList.toggle("on", k === st.method); });
      allBtn.classList.toggle("on", st.sel === null);
      tokSpans.forEach(function (sp, i) { sp.classList.toggle("sel", i === st.sel); });
      var concept = st.concept;
      if (m.medfocus && concept === null && !m.medfocus.fallback) concept = m.medfocus.winner;
      var pick = render(main, s, m, t, { opacity: st.opacity, showPred: st.showPred, showGT: st.showGT, concept: m.medfocus ? concept : null, markers: true, label: true });
      cap.textContent = m.name + " · " + pick.label + (m.error ? " · failed: " + m.error : "") +
        (m.medfocus ? " · winner: " + (m.medfocus.fallback ? "whole image (fallback)" : m.medfocus.winner) : "");
      colourBar(cbar, pick.map, m.map_units);
      medfocusPanel(m, t);
      cells.forEach(function (c) {
        var p = render(c.canvas, s, c.m, t, { w: 220, opacity: st.opacity, showPred: st.showPred, showGT: st.showGT, concept: null, markers: false, label: true });
        c.div.classList.toggle("on", c.m.name === st.method);
        c.sub.textContent = c.m.error ? "failed" : p.label + " · " + fmt(c.m.seconds, 2) + " s";
      });
    }
    update();
    return sec;
  }
})();
