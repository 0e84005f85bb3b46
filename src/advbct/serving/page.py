"""The service's web page: search by uploading an image, results as thumbnails with score and generation,
the active model and the backfill's progress (polled every two seconds). Plain HTML and fetch, no build step."""

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
</style>
</head>
<body>
<h1>advbct retrieval</h1>
<p>Active model: generation <strong id="active">?</strong> &middot;
   backfill <span id="backfill-state">?</span> <progress id="backfill-bar" max="1" value="0"></progress>
   <span id="backfill-text"></span></p>
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
