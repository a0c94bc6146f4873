/* terrasam serve: click on the image, get the object as a polygon, keep it, export. */
"use strict";

(async function () {
  const $ = (id) => document.getElementById(id);
  const statusBox = $("status");

  function status(text, isError) {
    statusBox.textContent = text;
    statusBox.classList.toggle("error", !!isError);
  }

  const info = await (await fetch("/api/info")).json();
  const token = info.token;

  async function api(method, path, body) {
    const response = await fetch(path, {
      method,
      headers: { "Content-Type": "application/json", "X-Terrasam-Token": token },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) throw new Error((data && data.error) || `HTTP ${response.status}`);
    return data;
  }

  // ------------------------------------------------------------------ the map
  $("title").textContent = info.name;
  $("meta").textContent =
    `${info.width} × ${info.height} px · ${info.crs} · model ${info.model}`;
  if (info.text) $("text-form").hidden = false;

  const map = L.map("map", {
    boxZoom: false, doubleClickZoom: false, dragging: false, keyboard: true,
    maxZoom: info.max_zoom, attributionControl: true,
  });
  const bases = {
    osm: ["https://tile.openstreetmap.org/{z}/{x}/{y}.png",
      { maxZoom: 19, attribution: "&copy; OpenStreetMap contributors" }],
    esri: ["https://server.arcgisonline.com/ArcGIS/rest/services/World_Imagery/MapServer/tile/{z}/{y}/{x}",
      { maxZoom: 19, attribution: "Tiles &copy; Esri" }],
  };
  if (bases[info.basemap]) L.tileLayer(...bases[info.basemap]).addTo(map);
  const extent = L.latLngBounds(info.bounds);
  L.tileLayer("/tiles/{z}/{x}/{y}.png", {
    bounds: extent, maxZoom: info.max_zoom, maxNativeZoom: info.max_zoom, noWrap: true,
    attribution: info.name,
  }).addTo(map);
  map.fitBounds(extent);
  $("map").classList.add("prompting");

  const promptLayer = L.layerGroup().addTo(map);
  const keptLayer = L.geoJSON(null, {
    interactive: false,
    style: (f) => {
      const hue = (f.properties.object * 137.508) % 360;
      const c = `hsl(${hue}, 90%, 55%)`;
      return { color: c, weight: 2, fillColor: c, fillOpacity: 0.35, className: "terrasam-kept" };
    },
  }).addTo(map);
  const candidateLayer = L.geoJSON(null, {
    interactive: false,
    style: () => ({ color: "#00e5ff", weight: 1.5, dashArray: "4 3", fillOpacity: 0.15,
      className: "terrasam-candidate" }),
  }).addTo(map);
  const currentLayer = L.geoJSON(null, {
    interactive: false,
    style: () => ({ color: "#ff00ff", weight: 3, fillColor: "#ff00ff", fillOpacity: 0.25,
      className: "terrasam-current" }),
  }).addTo(map);

  // ------------------------------------------------------------------ state
  const state = { prompts: [], current: null, candidates: [], seq: 0, kept: new Map() };
  window.terrasam = { map, state, info };

  function wrap(latlng) { return latlng.wrap(); }

  function drawPrompts() {
    promptLayer.clearLayers();
    for (const p of state.prompts) {
      if (p.kind === "box") {
        L.rectangle(p.bounds, { color: "#ffd400", weight: 2, fill: false, interactive: false })
          .addTo(promptLayer);
      } else {
        L.circleMarker(p.latlng, {
          radius: 5, weight: 2, color: "#000", fillOpacity: 1, interactive: false,
          fillColor: p.label ? "#20d020" : "#ff3030",
        }).addTo(promptLayer);
      }
    }
    $("undo").disabled = state.prompts.length === 0;
  }

  function setCurrent(feature) {
    state.current = feature;
    currentLayer.clearLayers();
    if (feature) {
      currentLayer.addData(feature);
      const p = feature.properties;
      currentLayer.eachLayer((layer) => layer.bindTooltip(`score ${p.score.toFixed(3)}`, {
        permanent: true, direction: "center", className: "terrasam-score",
      }).openTooltip());
      $("score").textContent =
        `${p.prompt_type} · score ${p.score.toFixed(3)} · ${Math.round(p.area_m2)} m²`;
    } else {
      $("score").textContent = state.prompts.length ? "no object" : "click on the image";
    }
    $("keep").disabled = !feature;
  }

  function viewBounds() {
    const b = map.getBounds();
    const west = Math.max(-180, b.getWest()), east = Math.min(180, b.getEast());
    const south = Math.max(-85.0511, b.getSouth()), north = Math.min(85.0511, b.getNorth());
    if (!(west < east && south < north)) return null;
    return { west, south, east, north };
  }

  async function segmentNow() {
    const seq = ++state.seq;
    drawPrompts();
    if (!state.prompts.length) { setCurrent(null); return; }
    const points = state.prompts.filter((p) => p.kind === "point")
      .map((p) => ({ lon: p.latlng.lng, lat: p.latlng.lat, label: p.label }));
    const box = state.prompts.find((p) => p.kind === "box");
    const body = { points, box: box ? box.box : null };
    status("segmenting…");
    const t0 = performance.now();
    try {
      const r = await api("POST", "/api/segment", body);
      if (seq !== state.seq) return;
      const seconds = ((performance.now() - t0) / 1000).toFixed(2);
      setCurrent(r.feature);
      const how = r.timing.embeddings_computed
        ? `${r.timing.embeddings_computed} window(s) embedded` : "embedding cached";
      status(r.feature ? `polygon in ${seconds} s (${how})` : r.message);
    } catch (err) {
      if (seq !== state.seq) return;
      state.prompts.pop(); // the prompt just given is the one that failed
      drawPrompts();
      status(err.message, true);
    }
  }

  function addPrompt(p) {
    if (p.kind === "box") state.prompts = state.prompts.filter((q) => q.kind !== "box");
    state.prompts.push(p);
    segmentNow();
  }

  function clearObject() {
    state.prompts = [];
    state.seq++;
    drawPrompts();
    setCurrent(null);
  }

  // ------------------------------------------------------------------ mouse
  let drag = null;
  const panMode = $("pan-mode");
  panMode.addEventListener("change", () => {
    if (panMode.checked) map.dragging.enable(); else map.dragging.disable();
    $("map").classList.toggle("prompting", !panMode.checked);
  });

  map.on("mousedown", (e) => {
    const ev = e.originalEvent;
    if (panMode.checked || ev.button === 2) return;
    ev.preventDefault();
    const pan = ev.button === 1 || ev.ctrlKey || ev.metaKey;
    drag = { pan, start: e.containerPoint, last: e.containerPoint, latlng: e.latlng,
      negative: ev.shiftKey || ev.altKey, rect: null, moved: false };
  });
  map.on("mousemove", (e) => {
    if (!drag) return;
    const p = e.containerPoint;
    if (drag.pan) {
      map.panBy([drag.last.x - p.x, drag.last.y - p.y], { animate: false });
      drag.last = p;
      return;
    }
    if (!drag.moved && drag.start.distanceTo(p) < 5) return;
    drag.moved = true;
    const b = L.latLngBounds(drag.latlng, e.latlng);
    if (drag.rect) drag.rect.setBounds(b);
    else drag.rect = L.rectangle(b, { color: "#ffd400", weight: 1, dashArray: "3 3",
      fill: false, interactive: false }).addTo(map);
  });
  map.on("mouseup", (e) => {
    if (!drag) return;
    const d = drag;
    drag = null;
    if (d.rect) map.removeLayer(d.rect);
    if (d.pan) return;
    if (d.moved) {
      const a = wrap(d.latlng), b = wrap(e.latlng);
      const box = { west: Math.min(a.lng, b.lng), south: Math.min(a.lat, b.lat),
        east: Math.max(a.lng, b.lng), north: Math.max(a.lat, b.lat) };
      if (box.west < box.east && box.south < box.north) {
        addPrompt({ kind: "box", box, bounds: L.latLngBounds(a, b) });
      }
    } else {
      addPrompt({ kind: "point", latlng: wrap(d.latlng), label: d.negative ? 0 : 1 });
    }
  });
  $("map").addEventListener("contextmenu", (ev) => ev.preventDefault());

  // ------------------------------------------------------------------ objects
  function addKept(features) {
    for (const f of features) {
      state.kept.set(f.properties.object, f);
      keptLayer.addData(f);
      const li = document.createElement("li");
      li.dataset.object = f.properties.object;
      const p = f.properties;
      li.textContent = `#${p.object} ${p.prompt_type} · ${p.score.toFixed(2)} · ` +
        `${Math.round(p.area_m2)} m²`;
      const del = document.createElement("button");
      del.textContent = "×";
      del.title = "delete";
      del.addEventListener("click", () => deleteObject(p.object));
      li.appendChild(del);
      $("kept").appendChild(li);
    }
    $("n-kept").textContent = state.kept.size;
  }

  function redrawKept() {
    keptLayer.clearLayers();
    for (const f of state.kept.values()) keptLayer.addData(f);
    $("n-kept").textContent = state.kept.size;
  }

  async function deleteObject(id) {
    try {
      await api("DELETE", `/api/objects/${id}`);
      state.kept.delete(id);
      const li = document.querySelector(`#kept li[data-object="${id}"]`);
      if (li) li.remove();
      redrawKept();
      status(`object ${id} deleted`);
    } catch (err) { status(err.message, true); }
  }

  async function keep(ids) {
    const r = await api("POST", "/api/objects", { candidates: ids });
    addKept(r.features);
    return r.features.length;
  }

  $("keep").addEventListener("click", async () => {
    if (!state.current) return;
    try {
      await keep([state.current.id]);
      clearObject();
      status("object kept");
    } catch (err) { status(err.message, true); }
  });
  $("undo").addEventListener("click", () => { state.prompts.pop(); segmentNow(); });
  $("clear").addEventListener("click", () => { clearObject(); status(""); });

  function showCandidates(collection) {
    candidateLayer.clearLayers();
    state.candidates = collection.features.map((f) => f.id);
    candidateLayer.addData(collection);
    $("candidates").hidden = state.candidates.length === 0;
    $("candidate-count").textContent = `${state.candidates.length} objects`;
  }

  async function inView(path, extra, what) {
    const bounds = viewBounds();
    if (!bounds) { status("the view is empty", true); return; }
    status(`${what}…`);
    try {
      const r = await api("POST", path, { bounds, ...extra });
      showCandidates(r);
      status(`${r.features.length} objects in ${r.timing.total_s.toFixed(1)} s`);
    } catch (err) { status(err.message, true); }
  }

  $("everything").addEventListener("click", () => inView("/api/everything", {},
    "segmenting everything in view"));
  $("text-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("text").value.trim();
    if (text) inView("/api/text", { text }, `looking for “${text}”`);
  });
  $("keep-all").addEventListener("click", async () => {
    try {
      const n = await keep(state.candidates);
      showCandidates({ features: [] });
      status(`${n} objects kept`);
    } catch (err) { status(err.message, true); }
  });
  $("discard").addEventListener("click", () => showCandidates({ features: [] }));

  async function exportAs(format) {
    status(`exporting ${format}…`);
    try {
      const response = await fetch(`/api/export?format=${format}`);
      if (!response.ok) {
        const data = await response.json().catch(() => null);
        throw new Error((data && data.error) || `HTTP ${response.status}`);
      }
      const disposition = response.headers.get("Content-Disposition") || "";
      const match = /filename="([^"]+)"/.exec(disposition);
      const url = URL.createObjectURL(await response.blob());
      const a = document.createElement("a");
      a.href = url;
      a.download = match ? match[1] : `objects.${format}`;
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
      status(`exported ${a.download}`);
    } catch (err) { status(err.message, true); }
  }
  $("export-gpkg").addEventListener("click", () => exportAs("gpkg"));
  $("export-geojson").addEventListener("click", () => exportAs("geojson"));

  // ------------------------------------------------------------------ keys
  document.addEventListener("keydown", (ev) => {
    if (ev.target && ["INPUT", "TEXTAREA"].includes(ev.target.tagName)) return;
    if (ev.key === "Enter") $("keep").click();
    else if (ev.key === "Escape") $("clear").click();
    else if (ev.key === "Backspace" || ((ev.ctrlKey || ev.metaKey) && ev.key === "z")) {
      ev.preventDefault();
      $("undo").click();
    }
  });

  // ------------------------------------------------------------------ background embeddings
  let prefetchTimer = null;
  function prefetch() {
    clearTimeout(prefetchTimer);
    prefetchTimer = setTimeout(() => {
      const bounds = viewBounds();
      if (bounds) api("POST", "/api/prefetch", { bounds }).catch(() => {});
    }, 250);
  }
  map.on("moveend", prefetch);
  prefetch();

  const kept = await (await fetch("/api/objects")).json();
  addKept(kept.features);
  document.body.dataset.ready = "1";
  status("ready: click on the image");
})().catch((err) => {
  const box = document.getElementById("status");
  box.textContent = `could not start: ${err.message}`;
  box.classList.add("error");
});
