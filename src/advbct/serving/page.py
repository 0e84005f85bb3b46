"""The service's web page: search by uploading an image, results as thumbnails with score and generation,
the active model, the backfill's progress and, with ``advbct serve --probe``, the live watch's quality curve
against its threshold (polled every two seconds). Plain HTML, fetch and inline SVG, no build step."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>advbct search</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem; max-width: 60rem; }
  #results { display: flex; flex-wrap: wrap; gap: 0.75rem; margin-top: 1rem; }
  figure { margin: 0; width: 8rem; text-align: center; font-size: 0.8rem; }
  figure img { width: 8rem; height: 8rem; object-fit: cover; image-rendering: pixelated; border: 1px solid #ccc; }
  progress { width: 20rem; }
  .error { color: #b00020; }
  #watch svg { border: 1px solid #ccc; background: #fafafa; }
</style>
</head>
<body>
<h1>advbct retrieval</h1>
<p>Active model: generation <strong id="active">?</strong> &middot;
   backfill <span id="backfill-state">?</span> <progress id="backfill-bar" max="1" value="0"></progress>
   <span id="backfill-text"></span></p>
<div id="watch" hidden>
  <p>Live watch (<span id="watch-metric"></span> of the probe, searched as served):
     <span id="watch-text"></span></p>
  <svg id="watch-plot" width="480" height="140" viewBox="0 0 480 140"></svg>
</div>
<form id="search-form">
  <input type="file" id="query" name="image" accept="image/*" required>
  <label>top <input type="number" id="k" value="12" min="1" max="100"></label>
  <button type="submit">Search</button>
</form>
<p id="message"></p>
<div id="results"></div>
<script>
async function refresh() {
  const models = await (await fetch("/models")).json();
  document.getElementById("active").textContent = models.active;
  const b = await (await fetch("/backfill")).json();
  const total = Object.values(b.by_generation).reduce((a, c) => a + c, 0);
  document.getElementById("backfill-state").textContent = b.state;
  const bar = document.getElementById("backfill-bar");
  bar.max = Math.max(total, 1); bar.value = total - (b.remaining ?? total);
  document.getElementById("backfill-text").textContent =
    `${total - (b.remaining ?? total)} / ${total} items at generation ${models.active}`;
  drawWatch(b.watch, total);
}
function drawWatch(watch, total) {
  const box = document.getElementById("watch");
  if (!watch) { box.hidden = true; return; }
  box.hidden = false;
  document.getElementById("watch-metric").textContent = watch.metric;
  const last = watch.points[watch.points.length - 1];
  document.getElementById("watch-text").textContent =
    (last ? `${last.score.toFixed(3)} at ${last.done} re-embedded` : "no point yet") +
    (watch.threshold == null ? "" : `; threshold ${watch.threshold.toFixed(3)}`) +
    (watch.paused_because ? `; paused: ${watch.paused_because}` : "");
  const scores = watch.points.map((p) => p.score).concat(watch.threshold ?? []);
  const top = Math.max(1e-6, ...scores) * 1.1;
  const x = (done) => 10 + 460 * done / Math.max(total, 1);
  const y = (score) => 130 - 120 * score / top;
  const line = watch.points.map((p) => `${x(p.done).toFixed(1)},${y(p.score).toFixed(1)}`).join(" ");
  const limit = watch.threshold == null ? "" :
    `<line x1="10" x2="470" y1="${y(watch.threshold)}" y2="${y(watch.threshold)}" stroke="#888" stroke-dasharray="4"/>`;
  document.getElementById("watch-plot").innerHTML =
    limit + `<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="${line}"/>`;
}
document.getElementById("search-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = new FormData();
  body.append("image", document.getElementById("query").files[0]);
  body.append("k", document.getElementById("k").value);
  const response = await fetch("/search", { method: "POST", body });
  const message = document.getElementById("message");
  const results = document.getElementById("results");
  results.innerHTML = "";
  if (!response.ok) {
    message.className = "error";
    message.textContent = (await response.json()).detail;
    return;
  }
  const data = await response.json();
  message.className = "";
  message.textContent = `${data.hits.length} results (query model: generation ${data.active})`;
  for (const hit of data.hits) {
    const figure = document.createElement("figure");
    figure.className = "hit";
    figure.innerHTML = `<img src="/items/${hit.id}/image" alt="item ${hit.id}">` +
      `<figcaption>#${hit.id} &middot; ${hit.score.toFixed(3)} &middot; gen ${hit.generation}</figcaption>`;
    results.appendChild(figure);
  }
});
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
"""
