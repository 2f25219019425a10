// alignfuse web page: plain JS, no build step. Talks to the REST API of the same origin.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const els = {
    collection: $("collection"), query: $("query"), form: $("search-form"), btn: $("search-btn"),
    imageInput: $("image-input"), preview: $("query-preview"), clearImage: $("clear-image"), drop: $("drop"),
    k: $("k"), candidates: $("candidates"), fusion: $("fusion"), target: $("target"), rerank: $("rerank"),
    itc: $("itc-results"), itm: $("itm-results"), stats: $("stats"), timings: $("timings"),
    summary: $("summary"), status: $("status"), models: $("models"), apiKey: $("api-key"),
    keyRow: $("key-row"), keyToggle: $("key-toggle"), suggestions: $("suggestions"),
  };
  let catalog = { collections: [], models: null }; // the last /v1/collections answer
  let queryImage = null; // a File when searching by image
  let lastText = null; // the text of the last text→image search (what a reranked card's explain explains)
  const ex = {
    panel: $("explain"), img: $("explain-img"), heat: $("explain-heat"), words: $("explain-words"),
    info: $("explain-info"), close: $("explain-close"), data: null, pinned: null, token: 0,
  };
  const blobUrls = [];

  const KEY_STORE = "alignfuse.apiKey";
  els.apiKey.value = localStorage.getItem(KEY_STORE) || "";
  els.keyRow.hidden = !els.apiKey.value;
  els.keyRow.addEventListener("submit", (ev) => { ev.preventDefault(); els.apiKey.dispatchEvent(new Event("change")); });
  els.keyToggle.addEventListener("click", () => { els.keyRow.hidden = !els.keyRow.hidden; });
  els.apiKey.addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, els.apiKey.value.trim());
    loadCollections();
  });

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const key = els.apiKey.value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  function setStatus(text, isError) {
    els.status.textContent = text || "";
    els.status.classList.toggle("error", !!isError);
  }

  async function api(path, options) {
    const resp = await fetch(path, Object.assign({}, options, { headers: headers((options || {}).headers) }));
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok) {
      const err = body && body.error ? body.error : { code: String(resp.status), message: resp.statusText };
      const e = new Error(err.message || "request failed");
      e.code = err.code; e.status = resp.status; e.retryAfter = resp.headers.get("Retry-After");
      throw e;
    }
    return body;
  }

  // a spec as the page shows it: the project's own models without their family prefix
  function short(spec) { return spec ? String(spec).replace(/^alignfuse:/, "") : "none"; }

  function pipelineOf(c, m) {
    return `${short(c.dual_encoder)} → ${m && m.reranker ? short(m.reranker) : "no reranker"}`;
  }

  // the models line: the chosen collection's pipeline, and where and how the models run
  function showModels() {
    const m = catalog.models;
    if (!m) return;
    const c = catalog.collections.find((x) => x.name === els.collection.value);
    const parts = [c ? `pipeline ${c.dual_encoder} → ${m.reranker || "no reranker"}` : `dual encoder ${m.dual_encoder}` + (m.reranker ? ` · reranker ${m.reranker}` : " · no reranker")];
    parts.push(m.device, `precision ${m.precision}`);
    if (m.runtime) parts.push(`runtime ${m.runtime}`);
    els.models.textContent = parts.join(" · ");
    els.models.title = (m.dual_encoders && m.dual_encoders.length ? `dual encoders served: ${m.dual_encoders.join(", ")}` : "");
  }

  async function loadCollections() {
    try {
      const data = await api("/v1/collections");
      catalog = data;
      const previous = els.collection.value;
      const m = data.models;
      els.collection.textContent = "";
      for (const c of data.collections) {
        const opt = document.createElement("option");
        opt.value = c.name;
        opt.textContent = `${c.name} · ${pipelineOf(c, m)} · ${c.images} images`;
        opt.title = c.compatible ? `dual encoder ${c.dual_encoder} → reranker ${m.reranker || "none"}; ${c.images} images, ${c.texts} texts` : (c.error || "not served");
        opt.disabled = !c.compatible;
        opt.dataset.dual = c.dual_encoder;
        els.collection.appendChild(opt);
      }
      // default: the collection picked before, else the first of the default pipeline (the default dual
      // encoder), else the first one served
      const served = data.collections.filter((c) => c.compatible);
      const pick = served.find((c) => c.name === previous) || served.find((c) => c.dual_encoder === m.dual_encoder) || served[0];
      if (pick) els.collection.value = pick.name;
      showModels();
      els.rerank.disabled = !m.reranker;
      if (!m.reranker) els.rerank.checked = false;
      if (!data.collections.length) setStatus("No collections yet: build one with `alignfuse build`.");
      else setStatus("");
      loadSuggestions();
    } catch (e) {
      if (e.status === 503) { setStatus("Models are loading…"); setTimeout(loadCollections, 1000); return; }
      if (e.status === 401) { els.keyRow.hidden = false; els.apiKey.focus(); setStatus("This server needs an API key: enter it above.", true); return; }
      setStatus(e.message, true);
    }
  }

  // suggested queries of the chosen collection (measured by `alignfuse demo`: true of at least one image
  // here, and the rerank helped); a click searches it
  let suggestToken = 0;
  async function loadSuggestions() {
    const name = els.collection.value;
    const token = ++suggestToken;
    els.suggestions.querySelectorAll(".suggestion").forEach((b) => b.remove());
    els.suggestions.hidden = true;
    if (!name) return;
    let data;
    try { data = await api(`/v1/collections/${encodeURIComponent(name)}/suggestions`); } catch (e) { return; }
    if (token !== suggestToken || !data.suggestions.length) return;
    for (const q of data.suggestions.slice(0, 8)) {
      const b = document.createElement("button");
      b.type = "button"; b.className = "suggestion"; b.dataset.query = q.text;
      const t = document.createElement("span"); t.textContent = q.text; b.appendChild(t);
      const g = document.createElement("span"); g.className = "gain";
      g.textContent = q.precision_rerank > q.precision_dual ? `+${Math.round((q.precision_rerank - q.precision_dual) * q.k)}` : "↑";
      b.appendChild(g);
      const first = (r) => (r === null || r === undefined ? "none" : `#${r}`);
      b.title = `true of ${q.n_true} image${q.n_true === 1 ? "" : "s"} here; true images in the top ${q.k}: ` +
        `${Math.round(q.precision_dual * q.k)} by the dual encoder → ${Math.round(q.precision_rerank * q.k)} reranked; ` +
        `first true image ${first(q.first_true_dual)} → ${first(q.first_true_rerank)}`;
      b.addEventListener("click", () => { clearImage(); els.query.value = q.text; search(); });
      els.suggestions.appendChild(b);
    }
    els.suggestions.hidden = false;
  }

  function thumbUrl(collection, id) {
    return `/v1/collections/${encodeURIComponent(collection)}/items/${id}/thumbnail?size=256`;
  }

  function setThumb(img, collection, id) {
    const url = thumbUrl(collection, id);
    if (!els.apiKey.value.trim()) { img.src = url; return; }
    fetch(url, { headers: headers() }).then((r) => r.ok ? r.blob() : null).then((b) => {
      if (!b) return;
      const u = URL.createObjectURL(b); blobUrls.push(u); img.src = u;
    });
  }

  function fmt(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }

  function card(hit, collection, mode) {
    const li = document.createElement("li");
    li.className = "hit";
    li.dataset.id = hit.id;
    if (hit.kind === "image") {
      const img = document.createElement("img");
      img.className = "thumb"; img.alt = hit.caption || `image ${hit.id}`; img.loading = "lazy";
      setThumb(img, collection, hit.id);
      li.appendChild(img);
    } else {
      const t = document.createElement("div");
      t.className = "textcard"; t.textContent = hit.caption || "";
      li.appendChild(t);
    }
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = mode === "itc" ? hit.rank_itc : hit.rank;
    li.appendChild(rank);
    if (mode === "itm") {
      const d = hit.rank_itc - hit.rank;
      const mv = document.createElement("span");
      mv.className = "move " + (d > 0 ? "up" : d < 0 ? "down" : "same");
      mv.textContent = d > 0 ? `↑${d}` : d < 0 ? `↓${-d}` : "=";
      mv.title = `ITC rank ${hit.rank_itc} → reranked ${hit.rank}`;
      li.appendChild(mv);
    } else if (hit.itm_prob !== null && hit.rank !== hit.rank_itc) {
      const mv = document.createElement("span");
      mv.className = "move same";
      mv.textContent = `→${hit.rank}`;
      mv.title = `reranked to ${hit.rank}`;
      li.appendChild(mv);
    }
    const body = document.createElement("div");
    body.className = "body";
    if (hit.kind === "image" && hit.caption) {
      const c = document.createElement("div"); c.className = "caption"; c.textContent = hit.caption; body.appendChild(c);
    }
    const s = document.createElement("div");
    s.className = "scores";
    const add = (cls, text, title) => {
      const e = document.createElement("span"); e.className = "score " + cls; e.textContent = text; e.title = title; s.appendChild(e);
    };
    add("itc", `cos ${fmt(hit.itc, 3)}`, "dual-encoder cosine (ITC)");
    if (hit.itm_prob !== null) add("itm", `p ${fmt(hit.itm_prob, 3)}`, `ITM match probability (logit ${fmt(hit.itm_logit, 2)})`);
    // the reranked column is sorted by this: the ITM "match" logit (ALBEF), plus the cosine with itm+itc or the
    // cosine times the dual encoder's logit scale with itm+itc_logit;
    // it is not monotone in p, which is a softmax over both ITM classes
    if (mode === "itm" && hit.itm_logit !== null) add("sort", `score ${fmt(hit.score, 2)}`, "sort key: ITM match logit (+ cosine with itm+itc, + cosine × logit scale with itm+itc_logit)");
    body.appendChild(s);
    if (hit.rerank_failed) {
      const f = document.createElement("div"); f.className = "flag"; f.textContent = "image unreadable: ITC score kept"; body.appendChild(f);
    }
    li.appendChild(body);
    if (mode === "itm" && hit.kind === "image" && lastText) {
      li.classList.add("explainable");
      li.tabIndex = 0;
      li.title = "Where does the reranker look? (click)";
      const text = lastText; // the query this card answers, fixed when the card is made
      const open = () => explain(hit, collection, text, li);
      li.addEventListener("click", open);
      li.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(); } });
    }
    return li;
  }

  // -- grounding heatmaps (POST /v1/explain) --------------------------------------------------------------
  function drawHeat(words) {
    const d = ex.data;
    const rows = d.grid[0], cols = d.grid[1];
    const sum = new Float32Array(rows * cols);
    for (const w of words) w.heatmap.forEach((row, r) => row.forEach((v, c) => { sum[r * cols + c] += v; }));
    let max = 0;
    for (const v of sum) max = Math.max(max, v);
    const canvas = ex.heat;
    canvas.width = cols; canvas.height = rows;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(cols, rows);
    for (let i = 0; i < sum.length; i++) {
      const v = max > 0 ? sum[i] / max : 0; // 1 at the peak: bright and warm; 0: dimmed
      img.data[i * 4] = Math.round(20 + v * 235);
      img.data[i * 4 + 1] = Math.round(24 + v * 98);
      img.data[i * 4 + 2] = Math.round(40 + v * 49);
      img.data[i * 4 + 3] = Math.round(255 * (0.72 * (1 - v) + 0.3 * v));
    }
    ctx.putImageData(img, 0, 0);
    canvas.dataset.words = words.map((w) => w.word).join(" ");
  }

  function showWord(idx) {
    const d = ex.data;
    if (!d) return;
    const chosen = idx === null ? d.words : [d.words[idx]];
    [...ex.words.children].forEach((el, i) => el.classList.toggle("on", idx !== null && i === idx));
    drawHeat(chosen);
  }

  async function explain(hit, collection, text, li) {
    const token = ++ex.token;
    document.querySelectorAll(".hit.explained").forEach((el) => el.classList.remove("explained"));
    li.classList.add("explained");
    ex.panel.hidden = false; ex.words.textContent = ""; ex.info.textContent = "Explaining…"; ex.data = null;
    ex.heat.getContext("2d").clearRect(0, 0, ex.heat.width, ex.heat.height);
    setThumb(ex.img, collection, hit.id);
    ex.img.alt = hit.caption || `image ${hit.id}`;
    try {
      const d = await api("/v1/explain", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ collection, item_id: hit.id, text }),
      });
      if (token !== ex.token) return; // another card was clicked meanwhile
      ex.data = d; ex.pinned = null;
      d.words.forEach((w, i) => {
        const span = document.createElement("span");
        span.className = "word" + (w.max > 0 ? "" : " cold");
        span.textContent = w.word;
        span.title = w.tokens.length > 1 ? `word pieces: ${w.tokens.join(" ")}` : w.word;
        span.addEventListener("mouseenter", () => showWord(i));
        span.addEventListener("mouseleave", () => showWord(ex.pinned));
        span.addEventListener("click", () => { ex.pinned = ex.pinned === i ? null : i; showWord(ex.pinned); });
        ex.words.appendChild(span);
      });
      ex.info.textContent = `item ${d.item_id} · ${d.reranker} · fusion layer ${d.layer} · ${d.grid[0]}×${d.grid[1]} patches · ITM p ${fmt(d.match_prob, 3)} (logit ${fmt(d.itm_logit, 2)})`;
      showWord(null);
      ex.panel.scrollIntoView({ block: "nearest", behavior: "smooth" });
    } catch (e) {
      if (token !== ex.token) return;
      ex.info.textContent = "";
      ex.panel.hidden = true;
      setStatus(`explain: ${e.message}`, true);
    }
  }
  ex.close.addEventListener("click", () => {
    ex.panel.hidden = true; ex.data = null;
    document.querySelectorAll(".hit.explained").forEach((el) => el.classList.remove("explained"));
  });

  function render(data) {
    while (blobUrls.length) URL.revokeObjectURL(blobUrls.pop());
    els.itc.textContent = ""; els.itm.textContent = "";
    const itcHits = data.itc_hits || data.hits;
    for (const h of itcHits) els.itc.appendChild(card(h, data.collection, "itc"));
    if (data.reranked) {
      for (const h of data.hits) els.itm.appendChild(card(h, data.collection, "itm"));
    } else {
      const note = document.createElement("li");
      note.className = "note";
      note.textContent = data.query === data.target
        ? `${data.query}→${data.target} search uses the dual encoder only.`
        : "Rerank is off for this search.";
      els.itm.appendChild(note);
    }
    const t = data.timings;
    els.timings.textContent = "";
    for (const [name, v] of [["encode", t.encode], ["ann", t.ann], ["rerank", t.rerank], ["total", t.total]]) {
      const c = document.createElement("span");
      c.className = "chip" + (name === "total" ? " total" : "");
      c.innerHTML = `<span>${name}</span><b></b>`;
      c.querySelector("b").textContent = `${fmt(v, 1)} ms`;
      els.timings.appendChild(c);
    }
    const coll = catalog.collections.find((c) => c.name === data.collection);
    const via = coll && catalog.models ? ` · ${data.reranked ? pipelineOf(coll, catalog.models) : short(coll.dual_encoder)}` : "";
    els.summary.textContent = `${data.query}→${data.target}${via} · ${data.candidates} candidates · ${data.pairs_scored} pairs scored` +
      (data.reranked ? ` · fusion ${data.fusion}` : " · not reranked") + ` · version ${data.version}`;
    els.stats.hidden = false;
  }

  async function search() {
    const collection = els.collection.value;
    if (!collection) { setStatus("Pick a collection first.", true); return; }
    const text = els.query.value.trim();
    if (!queryImage && !text) { setStatus("Type a query or choose an image.", true); els.query.focus(); return; }
    const common = {
      collection, k: Number(els.k.value) || 8, candidates: Number(els.candidates.value) || 64,
      rerank: els.rerank.checked, include_itc: true,
    };
    if (els.fusion.value) common.fusion = els.fusion.value; // else the reranker's default fusion
    if (els.target.value) common.target = els.target.value;
    const queryModality = queryImage ? "image" : "text";
    if (common.target === queryModality) common.rerank = false; // same-modality: dual encoder only
    lastText = queryImage ? null : text;
    els.btn.disabled = true; setStatus("Searching…");
    try {
      let data;
      if (queryImage) {
        const fd = new FormData();
        fd.append("file", queryImage, queryImage.name || "query");
        for (const [k, v] of Object.entries(common)) fd.append(k, String(v));
        data = await api("/v1/search/image", { method: "POST", body: fd });
      } else {
        data = await api("/v1/search", {
          method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify(Object.assign({ text }, common)),
        });
      }
      render(data);
      setStatus(data.hits.length ? "" : "No hits.");
    } catch (e) {
      if (e.status === 401) els.keyRow.hidden = false;
      const extra = e.retryAfter ? ` (retry in ${e.retryAfter} s)` : "";
      setStatus(`${e.message}${extra}`, true);
    } finally {
      els.btn.disabled = false;
    }
  }

  function useImage(file) {
    if (!file) return;
    queryImage = file;
    els.preview.src = URL.createObjectURL(file);
    els.preview.hidden = false; els.clearImage.hidden = false;
    els.query.value = ""; els.query.placeholder = `image: ${file.name || "pasted image"}`;
    search();
  }
  function clearImage() {
    queryImage = null; els.preview.hidden = true; els.clearImage.hidden = true; els.imageInput.value = "";
    els.query.placeholder = "Describe what you are looking for…  or drop an image here";
  }

  els.form.addEventListener("submit", (ev) => { ev.preventDefault(); if (els.query.value.trim()) clearImage(); search(); });
  els.imageInput.addEventListener("change", () => useImage(els.imageInput.files[0]));
  els.clearImage.addEventListener("click", clearImage);
  els.query.addEventListener("input", () => { if (queryImage && els.query.value) clearImage(); });
  els.collection.addEventListener("change", () => {
    showModels(); loadSuggestions();
    if (els.query.value.trim() || queryImage) search();
  });
  ["dragenter", "dragover"].forEach((t) => els.drop.addEventListener(t, (e) => { e.preventDefault(); els.drop.classList.add("drag"); }));
  ["dragleave", "drop"].forEach((t) => els.drop.addEventListener(t, (e) => { e.preventDefault(); els.drop.classList.remove("drag"); }));
  els.drop.addEventListener("drop", (e) => { const f = e.dataTransfer.files[0]; if (f) useImage(f); });

  loadCollections();
})();
