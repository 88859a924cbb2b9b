"""`vlmcache serve`: a local web page for a trained checkpoint.

Drop, paste or choose a photo (or click an example from the cache) to see typed labels ranked with
probabilities as bars — and, with a captioner, a caption; type a text query to see the best-matching
cached images with their dataset captions. Built on Starlette + uvicorn (small, well kept, no build step,
no front-end framework): the page is one HTML document with a little inline JavaScript calling JSON
endpoints, and loads nothing from the network (its Content-Security-Policy forbids it). Binds to
127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from vlmcache.app.predictor import MAX_LABELS, Predictor
from vlmcache.app.search_index import MAX_QUERY_CHARS
from vlmcache.data.datasets import ImageDecodeError, image_container, load_rgb, stored_image
from vlmcache.errors import VlmcacheError
from vlmcache.run.checkpoint import read_checkpoint

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_HITS = 50  # results per search request
PAGE_HITS = 12  # results the page asks for: two rows at full width
EXAMPLES = 6  # example photos offered from the cached split

FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" '
           'fill="#2f6fd6"/><circle cx="22" cy="10" r="3.2" fill="#fff"/><path d="M5 25 13 14l6 7 3-3 5 7z" '
           'fill="#fff"/></svg>')

STYLE = """
 :root { --ink: #1d2433; --muted: #5b6478; --line: #d9dee8; --accent: #2f6fd6; --soft: #e8f0fc;
         --error: #b00020; --page: #f4f6fa; }
 * { box-sizing: border-box; }
 body { font: 16px/1.5 system-ui, sans-serif; margin: 0; color: var(--ink); background: var(--page); }
 main { max-width: 1000px; margin: 0 auto; padding: 1rem 1rem 2rem; }
 h1 { margin: .2rem 0 .4rem; font-size: 1.6rem; display: flex; align-items: center; gap: .5rem; }
 h1 img { width: 1.4em; height: 1.4em; }
 h2 { font-size: 1.2rem; margin: 0 0 .7rem; }
 .about { color: var(--muted); margin: 0 0 .4rem; font-size: .95rem; }
 @media (max-width: 680px) { .about { font-size: .88rem; } td.meter { width: 26%; } }
 .howto { margin: 0 0 1rem; }
 .note { color: var(--muted); font-size: .9rem; }
 code { background: #eceff5; border-radius: 4px; padding: 0 .25em; overflow-wrap: anywhere; }
 section { background: #fff; border: 1px solid var(--line); border-radius: 12px; padding: 1rem 1.1rem 1.2rem;
           margin-bottom: 1.2rem; }
 .photo-grid { display: grid; grid-template-columns: minmax(0, 5fr) minmax(0, 7fr); gap: 1.2rem; }
 @media (max-width: 680px) { .photo-grid { grid-template-columns: minmax(0, 1fr); } }
 #drop { border: 2px dashed #b9c3d6; border-radius: 10px; min-height: 230px; padding: .8rem; background: #fafbfd;
         display: flex; flex-direction: column; align-items: center; justify-content: center; gap: .6rem;
         text-align: center; }
 #drop.dragging { border-color: var(--accent); background: var(--soft); }
 #preview { max-width: 100%; max-height: 340px; border-radius: 6px; }
 #photo-name { font-size: .85rem; color: var(--muted); overflow-wrap: anywhere; margin: 0; }
 .visually-hidden { position: absolute; width: 1px; height: 1px; overflow: hidden; clip-path: inset(50%);
                    white-space: nowrap; }
 label { font-weight: 600; display: block; margin-bottom: .25rem; }
 input[type=text], input[type=search] { width: 100%; font: inherit; padding: .45rem .6rem; border: 1px solid #b0b8c8;
                                        border-radius: 6px; min-width: 0; }
 .row { display: flex; flex-wrap: wrap; gap: .5rem; margin-top: .5rem; }
 .row input { flex: 1 1 14rem; }
 .buttons { display: flex; gap: .5rem; }
 button, .button { font: inherit; padding: .45rem .95rem; border-radius: 6px; border: 1px solid var(--accent);
                   background: var(--accent); color: #fff; cursor: pointer; font-weight: 500; }
 button.secondary, .button.secondary { background: #fff; color: var(--accent); }
 button:disabled { opacity: .55; cursor: progress; }
 .button { display: inline-block; }
 input[type=file]:focus-visible + .button, button:focus-visible { outline: 3px solid #9cbcf0; outline-offset: 2px; }
 .examples { display: flex; flex-wrap: wrap; gap: .5rem; margin-top: .4rem; }
 .examples button { padding: 0; border: 2px solid transparent; background: none; border-radius: 7px; }
 .examples button:hover { border-color: var(--accent); }
 .examples img { width: 76px; height: 57px; object-fit: cover; display: block; border-radius: 5px; }
 .result { margin-top: .8rem; }
 .busy { color: var(--muted); }
 .spinner { display: inline-block; width: 1em; height: 1em; margin-right: .45em; vertical-align: -.15em;
            border: 2px solid var(--soft); border-top-color: var(--accent); border-radius: 50%;
            animation: spin .8s linear infinite; }
 @keyframes spin { to { transform: rotate(360deg); } }
 @media (prefers-reduced-motion: reduce) { .spinner { animation-duration: 3s; } }
 .error { color: var(--error); font-weight: 500; }
 .said { margin: 0; color: var(--muted); font-size: .85rem; }
 #caption { font-size: 1.25rem; margin: 0 0 .3rem; }
 table { width: 100%; border-collapse: collapse; table-layout: fixed; }
 td { padding: .3rem .35rem; vertical-align: middle; }
 td.rank { width: 2em; color: var(--muted); }
 td.label { overflow-wrap: anywhere; }
 td.meter { width: 34%; }
 td.percent { width: 4.4em; text-align: right; font-variant-numeric: tabular-nums; }
 .bar { background: var(--accent); height: 1.1em; border-radius: 3px; min-width: 2px; }
 .hits { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: .9rem; }
 .hit { margin: 0; font-size: .85rem; }
 .hit button { display: block; width: 100%; padding: 0; border: 0; background: none; }
 .hit img { display: block; width: 100%; aspect-ratio: 4 / 3; object-fit: cover; border-radius: 6px; }
 .hit .text { display: -webkit-box; -webkit-line-clamp: 3; -webkit-box-orient: vertical; overflow: hidden;
              margin-top: .3rem; overflow-wrap: anywhere; }
 .hit .meta { color: var(--muted); font-size: .78rem; }
 dialog { border: 0; border-radius: 12px; padding: 1rem; width: min(760px, calc(100vw - 1.5rem));
          max-height: calc(100vh - 1.5rem); }
 dialog::backdrop { background: rgb(20 24 33 / 60%); }
 #viewer-image { display: block; width: 100%; max-height: 62vh; object-fit: contain; background: #111;
                 border-radius: 6px; }
 #viewer-captions { padding-left: 1.2rem; }
 #viewer-meta { overflow-wrap: anywhere; }
"""

# The page's behaviour. Every request goes through `ask`, which always ends in a result or an error in
# the page's own words: a stopped server, a reply that is not JSON and a request that never ends (two
# minutes) are reported like any refusal, and the buttons come back.
SCRIPT = r"""
'use strict';
const config = JSON.parse(document.getElementById('config').textContent);
const $ = id => document.getElementById(id);
const esc = s => String(s).replace(/[&<>"']/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
const TIMEOUT_MS = 120000;
const WORDS = {
  unreachable: 'The vlmcache server cannot be reached: it may have stopped. Start it again, then retry.',
  timeout: 'The server has not answered for two minutes; try again.',
  unexpected: status => 'The server sent a reply this page does not understand (HTTP ' + status + '); try again.',
  noPhoto: 'Choose a photo first: drop one on the page, paste one, or click an example.',
};

// One request of each kind at a time: a new one cancels the one before (so no answer arrives for a photo
// that was replaced), and the buttons that start it stay disabled until it ends (no duplicate requests).
const running = {};
function refreshButtons() {
  document.querySelectorAll('[data-while]').forEach(button => {
    button.disabled = button.dataset.while.split(' ').some(kind => kind in running);
  });
}
function showBusy(out, text) {
  out.innerHTML = '<p class="busy" role="status"><span class="spinner" aria-hidden="true"></span>' + esc(text) + '</p>';
}
function showError(out, message) { out.innerHTML = '<p class="error" role="alert">' + esc(message) + '</p>'; }
function cancel(kind) {
  const job = running[kind];
  if (job) { delete running[kind]; job.controller.abort(); refreshButtons(); }
}

async function ask(kind, url, init, out, busyText) {
  cancel(kind);
  const job = {controller: new AbortController(), timedOut: false};
  running[kind] = job;
  refreshButtons();
  showBusy(out, busyText);
  const timer = setTimeout(() => { job.timedOut = true; job.controller.abort(); }, TIMEOUT_MS);
  try {
    const reply = await fetch(url, {...init, signal: job.controller.signal});
    const data = await reply.json().catch(() => null);
    if (running[kind] !== job) return null;
    if (reply.ok && data !== null) return data;
    showError(out, data && typeof data.error === 'string' ? data.error : WORDS.unexpected(reply.status));
  } catch (error) {
    if (running[kind] === job) showError(out, job.timedOut ? WORDS.timeout : WORDS.unreachable);
  } finally {
    clearTimeout(timer);
    if (running[kind] === job) { delete running[kind]; refreshButtons(); }
  }
  return null;
}

// --- the photo: preview, labels, caption ---
let photo = null, photoURL = null, captioned = null;
const firstOut = () => $(config.classify ? 'classify-result' : 'caption-result');

function setPhoto(file) {
  photo = file; captioned = null;
  if (photoURL) URL.revokeObjectURL(photoURL);
  photoURL = URL.createObjectURL(file);
  const preview = $('preview');
  preview.src = photoURL; preview.alt = 'your photo: ' + file.name; preview.hidden = false;
  $('photo-name').textContent = file.name;
  $('drop-hint').hidden = true;
  runPhoto();
}
function runPhoto() {
  if (!photo) { showError(firstOut(), WORDS.noPhoto); return; }
  if (config.classify) rank();
  if (config.caption && captioned !== photo) caption();
}
function upload(extra) {
  const body = new FormData();
  body.append('image', photo, photo.name || 'photo');
  for (const [key, value] of Object.entries(extra)) body.append(key, value);
  return {method: 'POST', body};
}
async function rank() {
  const out = $('classify-result');
  const data = await ask('classify', 'classify', upload({labels: $('labels').value}), out, 'Ranking the labels…');
  if (data) out.innerHTML = rankingHTML(data);
}
function rankingHTML(data) {
  const rows = data.rows.map(r => {
    const percent = (100 * r.probability).toFixed(1);
    return '<tr><td class="rank">' + Number(r.rank) + '</td><td class="label">' + esc(r.prompt) + '</td>' +
      '<td class="meter"><div class="bar" style="width:' + percent + '%"></div></td>' +
      '<td class="percent">' + percent + '%</td></tr>';
  }).join('');
  return '<table id="ranking">' + rows + '</table><p class="note">How well each label fits the photo, compared ' +
    'with the other labels only (the percentages add up to 100).</p>';
}
async function caption() {
  const asked = photo;
  const data = await ask('caption', 'caption', upload({}), $('caption-result'), 'Writing a caption…');
  if (!data) return;
  $('caption-result').innerHTML = '<p class="said">The captioner says:</p><p id="caption">' + esc(data.caption) + '</p>';
  captioned = asked;
}
function clearPhoto() {
  cancel('classify'); cancel('caption');
  photo = null; captioned = null;
  if (photoURL) URL.revokeObjectURL(photoURL);
  photoURL = null;
  const preview = $('preview');
  preview.hidden = true; preview.removeAttribute('src');
  $('photo-name').textContent = ''; $('drop-hint').hidden = false; $('image').value = '';
  ['classify-result', 'caption-result'].forEach(id => { if ($(id)) $(id).innerHTML = ''; });
}
// A cached image as the photo: fetched from the page's own server, then sent back like any upload.
async function useCached(row, name) {
  try {
    const reply = await fetch('image/' + Number(row));
    if (!reply.ok) throw new Error(reply.status);
    const blob = await reply.blob();
    setPhoto(new File([blob], name, {type: blob.type}));
  } catch (error) {
    showError(firstOut(), WORDS.unreachable);
  }
}

const hasFiles = event => event.dataTransfer && Array.from(event.dataTransfer.types).includes('Files');
function watchPhotoInputs() {
  $('photo-form').onsubmit = event => { event.preventDefault(); runPhoto(); };
  $('photo-clear').onclick = clearPhoto;
  $('image').onchange = () => { if ($('image').files[0]) setPhoto($('image').files[0]); };
  $('preview').onerror = () => { if (photo) $('preview').hidden = true; };
  // Drops anywhere on the page count, so a near miss does not open the file in place of the page.
  document.addEventListener('dragover', event => {
    if (hasFiles(event)) { event.preventDefault(); $('drop').classList.add('dragging'); }
  });
  document.addEventListener('dragleave', event => { if (!event.relatedTarget) $('drop').classList.remove('dragging'); });
  document.addEventListener('drop', event => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    $('drop').classList.remove('dragging');
    if (event.dataTransfer.files[0]) setPhoto(event.dataTransfer.files[0]);
  });
  document.addEventListener('paste', event => {
    const file = Array.from((event.clipboardData && event.clipboardData.files) || []).find(f => f.type.startsWith('image/'));
    if (file) { event.preventDefault(); setPhoto(file); }
  });
  document.querySelectorAll('.examples button').forEach(button => {
    button.onclick = () => useCached(button.dataset.row, button.dataset.name);
  });
}

// --- search ---
let hits = [];
function hitHTML(hit, index) {
  const text = hit.captions[0] || hit.image_id;
  const more = hit.captions.length > 1 ? ' · +' + (hit.captions.length - 1) + ' captions' : '';
  return '<figure class="hit"><button type="button" data-hit="' + index + '" title="Show the full image and all its captions">' +
    '<img src="image/' + Number(hit.row) + '" alt="' + esc(text) + '" loading="lazy"></button><figcaption>' +
    '<div class="text">' + esc(text) + '</div><div class="meta" title="' + esc(config.scoreHelp) + '">#' + Number(hit.rank) +
    ' · ' + esc(config.scoreName) + ' ' + Number(hit.score).toFixed(2) + more + '</div></figcaption></figure>';
}
async function search(event) {
  event.preventDefault();
  const query = $('query').value, out = $('search-result');
  const data = await ask('search', 'search?top=' + config.top + '&q=' + encodeURIComponent(query), {}, out, 'Searching…');
  if (!data) return;
  hits = data.hits;
  out.innerHTML = '<p class="note" id="search-summary">The ' + hits.length + ' closest of ' +
    Number(data.searched).toLocaleString('en') + ' images to “' + esc(query) + '”. ' +
    'Click one for the full image and all its captions.</p><div class="hits">' + hits.map(hitHTML).join('') + '</div>';
  out.querySelectorAll('[data-hit]').forEach(button => { button.onclick = () => openHit(hits[button.dataset.hit]); });
}
function openHit(hit) {
  $('viewer-image').src = 'image/' + Number(hit.row);
  $('viewer-image').alt = hit.captions[0] || hit.image_id;
  $('viewer-captions').innerHTML = hit.captions.map(c => '<li>' + esc(c) + '</li>').join('') || '<li>(no captions cached)</li>';
  $('viewer-meta').textContent = hit.image_id + ' · result #' + hit.rank + ' · ' + config.scoreName + ' ' +
    Number(hit.score).toFixed(3);
  const use = $('viewer-use');
  if (use) use.onclick = () => { $('viewer').close(); useCached(hit.row, hit.image_id); $('photo-section').scrollIntoView(); };
  $('viewer').showModal();
}
function clearSearch() {
  cancel('search');
  hits = []; $('query').value = ''; $('search-result').innerHTML = '';
}

if (config.classify || config.caption) watchPhotoInputs();
if (config.search) {
  $('search-form').onsubmit = search;
  $('search-clear').onclick = clearSearch;
  $('viewer-close').onclick = () => $('viewer').close();
}
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vlmcache · @@title@@</title>
<link rel="icon" href="favicon.svg" type="image/svg+xml">
<style>@@style@@</style></head><body><main>
<header><h1><img src="favicon.svg" alt="">vlmcache</h1>
<p class="about" id="about">@@about@@</p>
<p class="howto" id="howto">@@howto@@</p></header>
@@sections@@
</main>
<script type="application/json" id="config">@@config@@</script>
<script>@@script@@</script></body></html>"""

# The script's hash goes in the page's Content-Security-Policy: only this script runs, only this server is
# asked for anything, and a name that slipped past escaping still could not run code.
SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
PAGE_HEADERS = {
    "Content-Security-Policy": (f"default-src 'none'; script-src 'sha256-{SCRIPT_HASH}'; style-src 'unsafe-inline'; "
                                "img-src 'self' blob: data:; connect-src 'self'; form-action 'none'; "
                                "base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

PROJECTOR_WORDS = {"linear": "a linear projector", "mlp": "an MLP projector", "ndlinear": "an NdLinear projector",
                   "cross-attention": "a cross-attention projector", "resampler": "a Perceiver-style resampler"}
LOSS_WORDS = {"infonce": "InfoNCE (CLIP's contrastive loss)", "sigmoid": "the sigmoid loss (SigLIP's)"}
DATASET_WORDS = {"flickr8k": "Flickr8k", "karpathy": "Karpathy-split", "pairs": "image–caption",
                 "imagefolder": "labelled-folder", "webdataset": "webdataset"}


@dataclass
class Gallery:
    """The cached images the page may show: one split's recorded images (row = the searched row), the
    dataset's captions of each, and the folder every served image must lie in."""

    split: str
    dataset: str  # in words, e.g. "Flickr8k"
    image_ids: list[str]
    image_paths: list[str]
    captions: list[list[str]]
    root: Path

    def image(self, row: int) -> Path | bytes | None:
        """What the page may send for a row (see servable_image), or None."""
        return servable_image(self.image_paths[row], self.root) if 0 <= row < len(self.image_paths) else None

    def examples(self, count: int = EXAMPLES) -> list[int]:
        """Up to `count` rows spread over the split whose images can be served."""
        step = max(1, len(self.image_paths) // count)
        return [row for row in range(0, len(self.image_paths), step) if self.image(row) is not None][:count]


def load_gallery(opened, split: str, image_ids: list[str] | None = None,
                 image_paths: list[str] | None = None) -> Gallery:
    """The gallery of a cache's split: its recorded images (or the `image_paths` kept, in their order — the
    searched rows) with each image's captions from the cache index."""
    image_rows, caption_rows = opened.split_rows(split)
    recorded = opened.index_rows("image_path", image_rows)
    if image_paths is None:
        image_ids, image_paths = opened.index_rows("image_id", image_rows), recorded
    row_of = _kept_rows(recorded, image_paths)
    captions: list[list[str]] = [[] for _ in image_paths]
    owners = opened.index_rows("caption_image", caption_rows)
    for owner, text in zip(owners, opened.index_rows("caption", caption_rows), strict=True):
        row = row_of[int(owner) - image_rows.start]
        if row is not None and text.strip():
            captions[row].append(text.strip())
    dataset_format = str(opened.manifest["dataset"].get("format"))
    dataset = DATASET_WORDS.get(dataset_format, "cached")
    return Gallery(split, dataset, list(image_ids), list(image_paths), captions, _image_root(dataset_format, image_paths))


def _image_root(dataset_format: str, image_paths: list[str]) -> Path:
    """The folder the page may serve images from: the one that holds all of the split's recorded images (for
    images inside tar shards, the folder that holds the shards), or a folder holding nothing.

    Nothing is served for imported or synthetic caches: their image paths are labels found inside the data
    (a parquet column), never files vlmcache read, so they must not choose what the page sends.
    """
    if dataset_format.startswith(("imported", "synthetic")):
        return Path(os.devnull)
    folders = [os.path.dirname(_file_of(path)) for path in image_paths]
    try:
        return Path(os.path.commonpath(folders)) if folders else Path(os.devnull)  # an empty split serves nothing
    except ValueError:  # absolute and relative paths mixed: no folder holds them all
        return Path(os.devnull)


def _kept_rows(recorded: list[str], kept: list[str]) -> list[int | None]:
    """For each recorded image of a split, its row among the kept ones, or None where it was skipped.

    Captions point at recorded rows, but a searched split drops skipped images and renumbers the rest;
    the kept list is the recorded one with those dropped, order unchanged, so one walk matches them."""
    rows: list[int | None] = []
    matched = 0
    for path in recorded:
        found = matched < len(kept) and kept[matched] == path
        rows.append(matched if found else None)
        matched += found
    return rows


def _run_name(checkpoint: str | Path) -> str:
    """A checkpoint as a person names it: the run folder's name (never the path above it)."""
    path = Path(checkpoint).resolve()
    if path.is_dir():
        return path.name
    return path.parent.name if path.name == "best.safetensors" else f"{path.parent.name} ({path.name})"


def _short(name: str) -> str:
    """An encoder or model name without any folder in front of it (local models are named by path)."""
    return Path(str(name)).name


def _encoder_names(meta: dict, modality: str) -> str:
    """The frozen encoders of one side, e.g. 'efficientnet-lite0' (several feature sets joined with +)."""
    recorded = meta.get(f"{modality}_encoders") or [meta[f"{modality}_encoder"]]
    return html.escape(" + ".join(_short(encoder["name"]) for encoder in recorded))


def _trained_on(meta: dict, split: str) -> str:
    """'1,000 Flickr8k training images' from the run's cache manifest, or '' when it cannot be read."""
    from vlmcache.cache.store import read_manifest

    try:
        manifest = read_manifest(Path(meta["cache"]) / "manifest.json")
        images = int(manifest["dataset"]["splits"][split]["images"])
        return f"{images:,} {DATASET_WORDS.get(manifest['dataset'].get('format'), 'cached')} training images"
    except (VlmcacheError, KeyError, TypeError, ValueError):
        return ""


def describe_retrieval(meta: dict, name: str) -> str:
    """The retrieval checkpoint in words a newcomer reads (HTML, escaped)."""
    config, metrics = meta["config"], meta.get("best_metrics") or {}
    trained_on = _trained_on(meta, config.get("train_split", "train"))
    text = (f"<strong>{html.escape(name)}</strong>: "
            f"{PROJECTOR_WORDS.get(config['projector'], html.escape(config['projector']) + ' projector')} trained with "
            f"{LOSS_WORDS.get(config['loss'], html.escape(config['loss']))}"
            f"{' on ' + html.escape(trained_on) if trained_on else ''}, over frozen "
            f"{_encoder_names(meta, 'image')} image and {_encoder_names(meta, 'text')} text features.")
    if "t2i_r1" in metrics and "i2t_r1" in metrics:
        text += (f" On the {html.escape(config.get('val_split', 'val'))} split it ranks the right image first for "
                 f"{metrics['t2i_r1']:.1f}% of captions (text→image R@1) and a right caption first for "
                 f"{metrics['i2t_r1']:.1f}% of images (image→text R@1).")
    return text


def describe_captioner(meta: dict, name: str) -> str:
    """The captioner checkpoint in words (HTML, escaped)."""
    config, metrics = meta["config"], meta.get("best_metrics") or {}
    decoder = ("a small decoder trained from scratch" if config["decoder"] == "small" else
               f"the {html.escape(_short(config['decoder']))} language model"
               f" ({'fine-tuned' if config.get('tune_lm') else 'frozen'})")
    trained_on = _trained_on(meta, config.get("train_split", "train"))
    text = (f"<strong>{html.escape(name)}</strong>: a captioner — "
            f"{PROJECTOR_WORDS.get(config['projector'], html.escape(config['projector']) + ' projector')} feeding "
            f"{decoder}{', trained on ' + html.escape(trained_on) if trained_on else ''}, over frozen "
            f"{_encoder_names(meta, 'image')} image features.")
    if metrics.get("cider") is not None:
        text += f" Validation CIDEr {metrics['cider']:.1f}, BLEU-4 {metrics.get('bleu4', 0):.1f} (higher is better)."
    return text


@dataclass
class PageSpec:
    """What one page offers (set by the checkpoints served) and what it says about them."""

    title: str
    about: str  # HTML
    classify: bool
    caption: bool
    gallery: Gallery | None
    search: bool = False
    qbnorm: bool = False


def _howto(spec: PageSpec) -> str:
    """The short line of instructions at the top."""
    does = {(True, True): "it is captioned and your labels are ranked by how well they fit it",
            (True, False): "your labels are ranked by how well they fit it",
            (False, True): "the captioner writes a sentence about it"}[(spec.classify, spec.caption)]
    line = f"Drop a photo on the page, paste one (Ctrl+V), choose a file or click an example: {does}."
    if spec.search:
        line += " Or describe a picture in words to find the cached images that match it best."
    return line


def _photo_section(spec: PageSpec) -> str:
    """The photo section: drop zone with preview, labels (when ranking), results, examples."""
    heading = {(True, True): "Label and caption a photo", (True, False): "Rank labels for a photo",
               (False, True): "Caption a photo"}[(spec.classify, spec.caption)]
    button = "Rank labels" if spec.classify else "Caption"
    labels = ('<label for="labels">Labels, separated by commas</label>'
              '<input type="text" id="labels" name="labels" value="a dog, a cat, a car, a person" autocomplete="off" '
              'placeholder="a dog, a cat, a car">' if spec.classify else "")
    examples = ""
    if spec.gallery is not None and (rows := spec.gallery.examples()):
        tiles = "".join(
            f'<button type="button" data-row="{row}" data-name="{html.escape(spec.gallery.image_ids[row])}" '
            f'title="Use this example"><img src="image/{row}" alt="example: '
            f'{html.escape((spec.gallery.captions[row] or [spec.gallery.image_ids[row]])[0])}"></button>' for row in rows)
        examples = (f'<p class="note" id="examples-note">Or try an example from the {html.escape(spec.gallery.split)} '
                    f'split:</p><div class="examples" id="examples">{tiles}</div>')
    results = ('<div id="caption-result" class="result" aria-live="polite"></div>' if spec.caption else "") + \
              ('<div id="classify-result" class="result" aria-live="polite"></div>' if spec.classify else "")
    return f"""<section id="photo-section"><h2>{heading}</h2><div class="photo-grid">
<div id="drop"><img id="preview" alt="" hidden><p id="photo-name"></p>
<p id="drop-hint">Drop a photo here or paste one</p>
<input type="file" id="image" name="image" accept="image/*" class="visually-hidden">
<label for="image" class="button secondary">Choose a photo…</label></div>
<div><form id="photo-form">{labels}<div class="row"><button id="photo-button" type="submit" data-while="classify caption">
{button}</button><button id="photo-clear" type="button" class="secondary">Clear</button></div></form>
{results}{examples}</div></div></section>"""


def _search_section(spec: PageSpec) -> str:
    """The search section, with the line saying what is searched, and the full-image viewer."""
    gallery = spec.gallery
    scope = (f"Searches the {len(gallery.image_paths):,} images of the <strong>{html.escape(gallery.split)}</strong> "
             f"split of the {html.escape(gallery.dataset)} cache by what they show; each result lists the captions the "
             "dataset gives it.")
    use = ('<button type="button" id="viewer-use">Use this photo above</button>'
           if spec.classify or spec.caption else "")
    return f"""<section id="search-section"><h2>Search the cached images</h2><p class="note" id="search-scope">{scope}</p>
<form id="search-form"><label for="query">Describe the picture</label><div class="row">
<input type="search" id="query" maxlength="{MAX_QUERY_CHARS}" placeholder="a dog running on a beach" autocomplete="off">
<div class="buttons"><button id="search-button" type="submit" data-while="search">Search</button>
<button id="search-clear" type="button" class="secondary">Clear</button></div></div></form>
<div id="search-result" class="result" aria-live="polite"></div></section>
<dialog id="viewer" aria-label="Search result"><img id="viewer-image" alt=""><ol id="viewer-captions"></ol>
<p class="note" id="viewer-meta"></p><div class="row">{use}
<button type="button" id="viewer-close" class="secondary">Close</button></div></dialog>"""


def _other_half(spec: PageSpec) -> str:
    """A pointer to what this page could also do, and how (captioning and retrieval are separate runs)."""
    if not spec.caption:
        return ('<p class="note" id="other-half">To caption photos here too, start the page with a captioner run '
                'beside this one: <code>vlmcache serve RUN --captioner CAPTION_RUN</code>.</p>')
    if not spec.classify:
        return ('<p class="note" id="other-half">To rank labels and search the cached images here too, start the page '
                'from a retrieval run with this captioner beside it: <code>vlmcache serve RUN --captioner '
                'CAPTION_RUN</code>.</p>')
    return ""


def render_page(spec: PageSpec) -> str:
    """The whole page for a spec; every name in it is escaped, and the config travels as inert JSON."""
    score_name, score_help = (("QB-Norm score", "query-bank-normalised similarity: higher is closer")
                              if spec.qbnorm else ("similarity", "cosine similarity of your words and the image in "
                                                                 "the trained shared space: 1 is the closest possible"))
    config = {"classify": spec.classify, "caption": spec.caption, "search": spec.search, "top": PAGE_HITS,
              "scoreName": score_name, "scoreHelp": score_help}
    sections = _photo_section(spec) + (_search_section(spec) if spec.search else "") + _other_half(spec)
    values = {"title": html.escape(spec.title), "style": STYLE, "about": spec.about, "howto": html.escape(_howto(spec)),
              "sections": sections, "script": SCRIPT,
              # inert JSON inside <script>: '<', '>' and '&' escaped so no text can close the element
              "config": json.dumps(config).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")}
    # One pass: a value is never searched for markers, so a run named '@@script@@' stays a name.
    return re.sub(r"@@(\w+)@@", lambda marker: values[marker.group(1)], PAGE)


def _check_picture(path: str, name: str) -> None:
    """Refuse, in the page's words, an upload Pillow cannot open. Reads the header only, so the model's
    own decode stays the only full one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            pass
    except UnidentifiedImageError:
        raise VlmcacheError(f"{name} is not a picture this page can read; choose a JPEG, PNG or WebP photo.") from None
    except Image.DecompressionBombError:
        raise VlmcacheError(f"{name} has too many pixels to open safely; choose a smaller photo.") from None
    except (OSError, SyntaxError, ValueError):
        raise VlmcacheError(f"{name} looks damaged or cut short; choose another photo.") from None


def page_labels(text: str) -> list[str]:
    """The labels typed on the page, refused in the page's words when too few or too many."""
    labels = [label.strip() for label in text.split(",") if label.strip()]
    if len(labels) < 2:
        raise VlmcacheError("Type at least two labels, separated by commas, e.g. “a dog, a cat”.")
    if len(labels) > MAX_LABELS:
        raise VlmcacheError(f"That is {len(labels)} labels; the page ranks at most {MAX_LABELS} at a time.")
    return labels


def page_query(query: str) -> str:
    """A search query, refused in the page's words when empty or too long."""
    if not query.strip():
        raise VlmcacheError("Type what the picture should show, e.g. “a dog running on a beach”.")
    if len(query) > MAX_QUERY_CHARS:
        raise VlmcacheError(f"That description has {len(query):,} characters; keep it under {MAX_QUERY_CHARS:,}.")
    return query


async def _with_upload(request, use):
    """Run `use(path, form)` on the uploaded image (a temporary file) in a worker thread; JSON error replies.

    The body is counted as it arrives, so a chunked upload cannot get past the limit; the model work runs
    in a thread, so one slow request does not stall the others."""
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse

    too_large = {"error": f"That photo is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB; choose a smaller one."}
    if int(request.headers.get("content-length") or 0) > MAX_UPLOAD_BYTES + 64 * 1024:
        return JSONResponse(too_large, status_code=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_UPLOAD_BYTES + 64 * 1024:
            return JSONResponse(too_large, status_code=413)
    request._body = bytes(body)  # starlette parses the form from the body already read
    try:
        form = await request.form()
    except HTTPException:  # starlette's own refusal (a field over 1 MB, too many fields) is plain text: say it in JSON
        return JSONResponse({"error": f"The form is too large to read; keep the labels short (at most {MAX_LABELS})."},
                            status_code=400)
    upload = form.get("image")
    if upload is None or not hasattr(upload, "read"):
        return JSONResponse({"error": "Choose a photo first."}, status_code=400)
    data = await upload.read()
    if len(data) > MAX_UPLOAD_BYTES:
        return JSONResponse(too_large, status_code=413)
    name = upload.filename or "the photo"

    def run() -> dict:
        with tempfile.NamedTemporaryFile(suffix=Path(upload.filename or "upload").suffix) as handle:
            handle.write(data)
            handle.flush()
            _check_picture(handle.name, name)
            try:
                return use(handle.name, form)
            except VlmcacheError as error:
                raise VlmcacheError(str(error).replace(handle.name, name)) from None

    try:
        return JSONResponse(await run_in_threadpool(run))
    except VlmcacheError as error:
        return JSONResponse({"error": str(error)}, status_code=400)


def _starlette():
    """Starlette's pieces, or the one-line install hint."""
    try:
        from starlette import applications, responses, routing
    except ImportError:
        raise VlmcacheError("the web page needs starlette, uvicorn and python-multipart: pip install 'vlmcache[serve]'") from None
    return applications.Starlette, responses, routing.Route


def _is_captioner(checkpoint: str | Path) -> bool:
    return read_checkpoint(checkpoint)[1]["vlmcache"].get("kind") == "captioner"


def _caption_gallery(meta: dict) -> Gallery | None:
    """Examples for a page with only a captioner: its cache's default split, or none if the cache is gone."""
    from vlmcache.cache.store import open_cache

    try:
        opened = open_cache(meta["cache"])
        return load_gallery(opened, opened.default_split())
    except (VlmcacheError, KeyError):
        return None


def create_app(checkpoint: str | Path, split: str | None = None, qbnorm: bool = False,
               captioner: str | Path | None = None):
    """The Starlette app for a checkpoint (the tests drive it directly and through a real browser).

    A retrieval checkpoint gets label ranking and search, plus captions when `captioner` names a captioner
    run; a captioner checkpoint alone gets the caption page (its cache's images as examples)."""
    Starlette, responses, Route = _starlette()
    if _is_captioner(checkpoint):
        if captioner is not None:
            raise VlmcacheError(f"{checkpoint}: a captioner; pass the retrieval run first and the captioner with --captioner")
        captioner, predictor = checkpoint, None
    else:
        predictor = Predictor(checkpoint)
    writer = None
    if captioner is not None:
        from vlmcache.caption.predict import CaptionPredictor

        writer = CaptionPredictor(captioner)
        if predictor is not None:
            predictor.share_image_encoders(writer.encoders, writer.meta.get("image_encoders") or [writer.meta["image_encoder"]])

    if predictor is not None:
        chosen, _ = predictor.searchable(split)  # load everything a query needs now: the first query is as fast as the rest
        if qbnorm:
            predictor.image_bank(split)
        predictor.prompts.encoder  # noqa: B018
        from vlmcache.align.load import checkpoint_caches

        gallery = load_gallery(checkpoint_caches(predictor.meta)[0], chosen.name, chosen.image_ids, chosen.image_paths)
        about = describe_retrieval(predictor.meta, _run_name(checkpoint))
        if writer is not None:
            about += "<br>" + describe_captioner(writer.meta, _run_name(captioner))
        title = _run_name(checkpoint)
    else:
        gallery = _caption_gallery(writer.meta)
        about, title = describe_captioner(writer.meta, _run_name(captioner)), f"captioner {_run_name(captioner)}"
    spec = PageSpec(title, about, classify=predictor is not None, caption=writer is not None, gallery=gallery,
                    search=predictor is not None, qbnorm=qbnorm)
    return Starlette(routes=_routes(spec, responses, Route, predictor, writer, split))


def _routes(spec: PageSpec, responses, Route, predictor: Predictor | None, writer, split: str | None) -> list:
    """The page, its favicon, the JSON endpoints the spec offers, and the gallery's images."""
    from starlette.concurrency import run_in_threadpool

    JSONResponse = responses.JSONResponse
    page = render_page(spec)

    async def index(request):
        return responses.HTMLResponse(page, headers=PAGE_HEADERS)

    async def favicon(request):
        return responses.Response(FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    async def classify(request):
        def rank(path, form):
            rows, scale = predictor.rank_labels(path, page_labels(str(form.get("labels") or "")))
            return {"rows": [row.__dict__ for row in rows], "scale": scale}

        return await _with_upload(request, rank)

    async def caption(request):
        return await _with_upload(request, lambda path, form: {"caption": writer.caption([path])[0]})

    async def search(request):
        try:
            top = max(1, min(MAX_HITS, int(request.query_params.get("top", "8"))))
            query = page_query(request.query_params.get("q", ""))
            hits = await run_in_threadpool(predictor.search, query, top, split, None, spec.qbnorm)
        except (VlmcacheError, ValueError) as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        # Only what the page shows: no server paths leave the machine.
        return JSONResponse({"searched": len(spec.gallery.image_paths), "split": spec.gallery.split,
                             "hits": [{"rank": h.rank, "score": h.score, "image_id": h.image_id, "row": h.row,
                                       "captions": spec.gallery.captions[h.row]} for h in hits]})

    async def image(request):
        number = request.path_params["number"]
        found = spec.gallery.image(number) if spec.gallery is not None else None
        if found is None:
            return JSONResponse({"error": "no such image"}, status_code=404)
        if isinstance(found, bytes):  # an image inside a webdataset shard: its own bytes, never a path
            return responses.Response(found, media_type=_media_type(found))
        return responses.FileResponse(found)

    routes = [Route("/", index), Route("/favicon.svg", favicon), Route("/favicon.ico", favicon),
              Route("/image/{number:int}", image)]
    if spec.classify:
        routes.append(Route("/classify", classify, methods=["POST"]))
    if spec.search:
        routes.append(Route("/search", search))
    if spec.caption:
        routes.append(Route("/caption", caption, methods=["POST"]))
    return routes


def _file_of(recorded: str) -> str:
    """The file on disk that holds a recorded image: the image itself, or the data file that contains it."""
    container = image_container(recorded)
    return recorded if container is None else str(container)


def _media_type(data: bytes) -> str:
    """The MIME type of image bytes, from their own header (a stored image's name says nothing reliable)."""
    with Image.open(io.BytesIO(data)) as image:
        return Image.MIME.get(image.format or "", "application/octet-stream")


def servable_image(recorded: str, root: Path) -> Path | bytes | None:
    """What the page may send for a recorded image, or None.

    A file: its path if it is, right now, a regular file inside the dataset root that decodes as an image
    (symlinks are resolved first, so a swapped link cannot point outside). An image inside a webdataset
    shard or a row of a Hugging Face dataset: its own bytes, read from a data file inside the root, if they
    decode; its name is never turned into a path.
    """
    resolved_root = root.resolve()
    container = image_container(recorded)
    if container is not None:
        if not Path(os.path.realpath(container)).is_relative_to(resolved_root):
            return None
        try:
            data = stored_image(recorded).getvalue()
            load_rgb(recorded)
        except ImageDecodeError:
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
          qbnorm: bool = False, captioner: str | Path | None = None) -> None:
    """Run the page with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(checkpoint, split, qbnorm, captioner), host=host, port=port, log_level="warning")
