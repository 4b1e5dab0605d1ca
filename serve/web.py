"""The page at ``/``: type a prompt, see the images. Plain HTML and fetch(), no build step; it
calls the same ``/v1/images/generations`` endpoint as any client (with a key, if keys are on)."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>dalle2</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 56rem; margin: 2rem auto; padding: 0 1rem; }
  form { display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; }
  input[name=prompt] { flex: 1 1 20rem; padding: .4rem; }
  #images img { width: 192px; height: 192px; image-rendering: pixelated; margin: .25rem; border: 1px solid #ccc; }
  #status { color: #555; min-height: 1.5em; }
</style>
</head>
<body>
<h1>dalle2</h1>
<form id="form">
  <input name="prompt" placeholder="a red circle at the top left" required maxlength="1000">
  <label>n <input name="n" type="number" min="1" max="10" value="4" style="width:3.5rem"></label>
  <select name="size" id="size"></select>
  <label>seed <input name="seed" type="number" min="0" style="width:6rem"></label>
  <input name="key" type="password" placeholder="API key (if required)" style="width:11rem">
  <button>Generate</button>
</form>
<p id="status"></p>
<div id="images"></div>
<script>
const form = document.getElementById("form"), status = document.getElementById("status");
function headers() {
  const key = form.key.value.trim();
  return key ? {"Authorization": "Bearer " + key} : {};
}
async function loadSizes() {
  const reply = await fetch("v1/models", {headers: headers()});
  if (!reply.ok) return;
  const sizes = (await reply.json()).data[0].sizes;
  document.getElementById("size").innerHTML = sizes.map(s => `<option>${s}x${s}</option>`).reverse().join("");
}
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = {prompt: form.prompt.value, n: Number(form.n.value), response_format: "b64_json"};
  if (form.size.value) body.size = form.size.value;
  if (form.seed.value) body.seed = Number(form.seed.value);
  status.textContent = "generating...";
  const started = performance.now();
  const reply = await fetch("v1/images/generations", {
    method: "POST", headers: {"Content-Type": "application/json", ...headers()}, body: JSON.stringify(body)});
  const result = await reply.json();
  if (!reply.ok) { status.textContent = result.error.message; return; }
  status.textContent = `${result.data.length} images, seed ${result.seed}, ${((performance.now() - started) / 1000).toFixed(1)} s`;
  document.getElementById("images").innerHTML =
    result.data.map(d => `<img alt="" src="data:image/png;base64,${d.b64_json}">`).join("");
});
form.key.addEventListener("change", loadSizes);
loadSizes();
</script>
</body>
</html>
"""
