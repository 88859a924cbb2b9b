"""`vlmcache serve`: a local web page for a trained checkpoint.

Upload an image and type labels to see them ranked with probabilities as bars; type a text query to see
the best-matching cached images as thumbnails. Built on Starlette + uvicorn (small, well kept, no build
step, no front-end framework): the page is one HTML file with a few lines of JavaScript calling two JSON
endpoints. Binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import html
import os
import tempfile
from pathlib import Path

from vlmcache.app.predictor import Predictor
from vlmcache.data import tars
from vlmcache.data.datasets import ImageDecodeError, load_rgb
from vlmcache.errors import VlmcacheError
from vlmcache.run.checkpoint import read_checkpoint

MAX_UPLOAD_BYTES = 10 * 1024 * 1024

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vlmcache</title>
<style>
 body { font-family: system-ui, sans-serif; max-width: 960px; margin: 2em auto; color: #222; }
 section { border: 1px solid #ddd; border-radius: 8px; padding: 1em 1.5em; margin-bottom: 1.5em; }
 .bar { background: #4a7bd0; height: 1.1em; border-radius: 3px; }
 table { border-collapse: collapse; width: 100%; } td { padding: 0.25em 0.5em; }
 .error { color: #b00020; } .thumbs { display: flex; flex-wrap: wrap; gap: 10px; }
 .thumbs figure { margin: 0; width: 170px; font-size: 0.8em; overflow-wrap: anywhere; } .thumbs img { width: 170px; }
 form { margin-bottom: 0.8em; }
</style></head><body>
<h1>vlmcache</h1><p>Checkpoint <code>{checkpoint}</code> ({projector} + {loss}).</p>
<section><h2>Classify an image</h2>
<form id="classify-form"><input type="file" id="image" name="image" accept="image/*" required>
<input type="text" id="labels" name="labels" size="60" value="a dog, a cat, a car, a person"
 placeholder="comma-separated labels"> <button id="classify-button" type="submit">Rank labels</button></form>
<div id="classify-result"></div></section>
<section><h2>Search the cached images</h2>
<form id="search-form"><input type="text" id="query" size="60" placeholder="a dog running on a beach" required>
<button id="search-button" type="submit">Search</button></form><div id="search-result" class="thumbs"></div></section>
<script>
const esc = s => s.replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
document.getElementById('classify-form').onsubmit = async e => {
  e.preventDefault();
  const out = document.getElementById('classify-result'); out.textContent = 'ranking…';
  const body = new FormData(); body.append('image', document.getElementById('image').files[0]);
  body.append('labels', document.getElementById('labels').value);
  const reply = await fetch('classify', {method: 'POST', body}); const data = await reply.json();
  if (!reply.ok) { out.innerHTML = '<p class="error" id="error">' + esc(data.error) + '</p>'; return; }
  out.innerHTML = '<table id="ranking">' + data.rows.map(r => '<tr><td>' + r.rank + '</td><td class="label">' +
    esc(r.prompt) + '</td><td style="width:40%"><div class="bar" style="width:' + (100 * r.probability).toFixed(1) +
    '%"></div></td><td>' + (100 * r.probability).toFixed(1) + '%</td></tr>').join('') + '</table>' +
    '<p>probability = softmax(cosine × ' + data.scale.toFixed(1) + ', the learned logit scale)</p>';
};
document.getElementById('search-form').onsubmit = async e => {
  e.preventDefault();
  const out = document.getElementById('search-result'); out.textContent = 'searching…';
  const reply = await fetch('search?top=8&q=' + encodeURIComponent(document.getElementById('query').value));
  const data = await reply.json();
  if (!reply.ok) { out.innerHTML = '<p class="error">' + esc(data.error) + '</p>'; return; }
  out.innerHTML = data.hits.map(h => '<figure><img src="image/' + h.row + '" alt="' + esc(h.image_id) +
    '"><figcaption>' + h.rank + '. ' + esc(h.image_id) + ' (' + h.score.toFixed(3) + ')</figcaption></figure>').join('');
};
</script></body></html>"""


CAPTION_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vlmcache captioner</title>
<style> body { font-family: system-ui, sans-serif; max-width: 960px; margin: 2em auto; color: #222; }
 .error { color: #b00020; } #caption { font-size: 1.3em; } img { max-width: 480px; display: block; margin: 1em 0; }
</style></head><body>
<h1>vlmcache captioner</h1><p>Checkpoint <code>{checkpoint}</code> ({projector} → {decoder}).</p>
<form id="caption-form"><input type="file" id="image" name="image" accept="image/*" required>
<button id="caption-button" type="submit">Caption</button></form><img id="preview" alt=""><div id="caption-result"></div>
<script>
const esc = s => s.replace(/[&<>"]/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]));
document.getElementById('caption-form').onsubmit = async e => {
  e.preventDefault();
  const file = document.getElementById('image').files[0], out = document.getElementById('caption-result');
  document.getElementById('preview').src = URL.createObjectURL(file); out.textContent = 'captioning…';
  const body = new FormData(); body.append('image', file);
  const reply = await fetch('caption', {method: 'POST', body}); const data = await reply.json();
  out.innerHTML = reply.ok ? '<p id="caption">' + esc(data.caption) + '</p>'
                           : '<p class="error" id="error">' + esc(data.error) + '</p>';
};
</script></body></html>"""


async def _with_upload(request, use):
    """Run `use(path, form)` on the uploaded image (a temporary file) in a worker thread; JSON error replies.

    The body is counted as it arrives, so a chunked upload cannot get past the limit; the model work runs
    in a thread, so one slow request does not stall the others."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    too_large = {"error": f"upload larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB"}
    if int(request.headers.get("content-length") or 0) > MAX_UPLOAD_BYTES + 64 * 1024:
        return JSONResponse(too_large, status_code=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_UPLOAD_BYTES + 64 * 1024:
            return JSONResponse(too_large, status_code=413)
    request._body = bytes(body)  # starlette parses the form from the body already read
    form = await request.form()
    upload = form.get("image")
    if upload is None or not hasattr(upload, "read"):
        return JSONResponse({"error": "choose an image file to upload"}, status_code=400)
    data = await upload.read()
    if len(data) > MAX_UPLOAD_BYTES:
        return JSONResponse(too_large, status_code=413)

    def run() -> dict:
        with tempfile.NamedTemporaryFile(suffix=Path(upload.filename or "upload").suffix) as handle:
            handle.write(data)
            handle.flush()
            try:
                return use(handle.name, form)
            except VlmcacheError as error:
                raise VlmcacheError(str(error).replace(handle.name, upload.filename or "upload")) from None

    try:
        return JSONResponse(await run_in_threadpool(run))
    except VlmcacheError as error:
        return JSONResponse({"error": str(error)}, status_code=400)


def create_caption_app(checkpoint: str | Path):
    """The page for a captioner checkpoint: upload an image, read its caption."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    from vlmcache.caption.predict import CaptionPredictor

    predictor = CaptionPredictor(checkpoint)
    config = predictor.model.config
    page = (CAPTION_PAGE.replace("{checkpoint}", html.escape(str(checkpoint)))
            .replace("{projector}", html.escape(config.projector)).replace("{decoder}", html.escape(config.decoder)))

    async def index(request):
        return HTMLResponse(page)

    async def caption(request):
        return await _with_upload(request, lambda path, form: {"caption": predictor.caption([path])[0]})

    return Starlette(routes=[Route("/", index), Route("/caption", caption, methods=["POST"])])


def create_app(checkpoint: str | Path, split: str | None = None, qbnorm: bool = False):
    """The Starlette app for a checkpoint (the tests drive it directly and through a real browser); a
    captioner checkpoint gets the caption page instead."""
    try:
        from starlette.applications import Starlette
        from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
        from starlette.routing import Route
    except ImportError:
        raise VlmcacheError("the web page needs starlette, uvicorn and python-multipart: pip install 'vlmcache[serve]'") from None
    if read_checkpoint(checkpoint)[1]["vlmcache"].get("kind") == "captioner":
        return create_caption_app(checkpoint)
    predictor = Predictor(checkpoint)
    predictor.searchable(split)  # load everything a query needs now, so the first query is as fast as the rest
    if qbnorm:
        predictor.image_bank(split)
    predictor.prompts.encoder  # noqa: B018
    from starlette.concurrency import run_in_threadpool

    config = predictor.meta["config"]
    page = (PAGE.replace("{checkpoint}", html.escape(str(checkpoint))).replace("{projector}", html.escape(config["projector"]))
            .replace("{loss}", html.escape(config["loss"])))

    async def index(request):
        return HTMLResponse(page)

    async def classify(request):
        def rank(path, form):
            rows, scale = predictor.rank_labels(path, str(form.get("labels") or "").split(","))
            return {"rows": [row.__dict__ for row in rows], "scale": scale}

        return await _with_upload(request, rank)

    async def search(request):
        try:
            top = max(1, min(50, int(request.query_params.get("top", "8"))))
            hits = await run_in_threadpool(predictor.search, request.query_params.get("q", ""), top, split, None, qbnorm)
        except (VlmcacheError, ValueError) as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        # Only what the page shows: no server paths leave the machine.
        return JSONResponse({"hits": [{"rank": h.rank, "score": h.score, "image_id": h.image_id, "row": h.row}
                                      for h in hits]})

    async def image(request):
        chosen, _ = predictor.searchable(split)
        number = request.path_params["number"]
        found = servable_image(chosen.image_paths[number], root) if 0 <= number < len(chosen.image_paths) else None
        if found is None:
            return JSONResponse({"error": "no such image"}, status_code=404)
        if isinstance(found, bytes):  # an image inside a webdataset shard: its own bytes, never a path
            return Response(found, media_type=_media_type(chosen.image_paths[number]))
        return FileResponse(found)

    # Images are served only from inside the folder that holds all of the split's recorded images (for
    # images inside tar shards, the folder that holds the shards).
    root = Path(os.path.commonpath([os.path.dirname(_file_of(path)) for path in predictor.searchable(split)[0].image_paths]))

    return Starlette(routes=[Route("/", index), Route("/classify", classify, methods=["POST"]),
                             Route("/search", search), Route("/image/{number:int}", image)])


def _file_of(recorded: str) -> str:
    """The file on disk that holds a recorded image: the image itself, or the tar shard that contains it."""
    parts = tars.split_member_ref(recorded)
    return recorded if parts is None else str(parts[0])


def _media_type(recorded: str) -> str:
    extension = recorded.rsplit(".", 1)[-1].lower()
    return {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}.get(extension,
                                                                                                 "application/octet-stream")


def servable_image(recorded: str, root: Path) -> Path | bytes | None:
    """What the page may send for a recorded image, or None.

    A file: its path if it is, right now, a regular file inside the dataset root that decodes as an image
    (symlinks are resolved first, so a swapped link cannot point outside). An image inside a webdataset
    shard: the member's own bytes, read from a shard inside the root, if they decode; its name is never
    turned into a path.
    """
    resolved_root = root.resolve()
    parts = tars.split_member_ref(recorded)
    if parts is not None:
        if not Path(os.path.realpath(parts[0])).is_relative_to(resolved_root):
            return None
        try:
            data = tars.read_member(recorded).getvalue()
            load_rgb(recorded)
        except (FileNotFoundError, ImageDecodeError):
            return None
        return data
    path = Path(os.path.realpath(recorded))
    if not path.is_relative_to(resolved_root) or not path.is_file():
        return None
    try:
        load_rgb(path)
    except ImageDecodeError:
        return None
    return path


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, split: str | None = None,
          qbnorm: bool = False) -> None:
    """Run the page with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(checkpoint, split, qbnorm), host=host, port=port, log_level="warning")
