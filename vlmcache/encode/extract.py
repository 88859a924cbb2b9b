"""The one pass of the frozen encoders over a dataset, written as a resumable sharded cache.

Resuming works per shard: shards already on disk are kept, the rest are computed. Batches never cross
a shard boundary, so a shard computed after an interruption sees exactly the batches it would have seen
in an uninterrupted run, and its arrays are identical. Under `torchrun`, rank r computes the pending
shards r, r+N, r+2N, ...; rank 0 prepares the folder and writes the manifest after a barrier.
"""

from __future__ import annotations

import json
import os
import platform
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from vlmcache import distributed
from vlmcache.cache import query_encoder
from vlmcache.cache.hdf5 import h5py_version
from vlmcache.cache.layout import MODALITIES, layer_set_name
from vlmcache.cache.store import FORMAT_VERSION, now_iso, read_manifest, shard_name, shard_ranges
from vlmcache.cache.writer import (
    ExtractResult,
    PendingSet,
    _assign_folders,
    _recorded_provenance,
    check_out_folder,
    finalize_cache,
    prepare_cache,
    shard_pending,
    write_or_extend_shard,
)
from vlmcache.data import datasets
from vlmcache.encode import encoders
from vlmcache.encode.config import ExtractConfig
from vlmcache.errors import VlmcacheError
from vlmcache.files import FolderLock
from vlmcache.progress import make_progress

# A lost rank's one line ends so: shards are whole once on disk, so a rerun (with any number of ranks) keeps them.
# A rank that is only slow (far larger shards than its peers) also trips the process group's timeout.
DIST_RECOVERY = ("the shards already written are kept: fix the cause (or raise VLMCACHE_DIST_TIMEOUT if a rank was "
                 "only slow) and run the same extract again")




class _ImageRows(torch.utils.data.Dataset):
    """Decodes and preprocesses one image row; runs in DataLoader workers. Errors become a reason string."""

    def __init__(self, paths: list[str], preprocess: encoders.Preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int):
        try:
            image = datasets.load_rgb(self.paths[row], self.preprocess.draft_side(), self.preprocess.jpeg_decoder)
            return row, torch.from_numpy(self.preprocess(image)), ""
        except datasets.ImageDecodeError as error:
            size = self.preprocess.size
            return row, torch.zeros(3, size, size), str(error)


def _single_thread_worker(_: int) -> None:
    # Decoders are separate processes; their own torch thread pools would fight the forward pass for cores.
    torch.set_num_threads(1)


def _collate(items):
    rows, pixels, errors = zip(*items, strict=True)
    return list(rows), torch.stack(pixels), list(errors)


def _library_versions(sets: list[PendingSet]) -> dict:
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "h5py": h5py_version(), "numpy": np.__version__,
                "vlmcache": _vlmcache_version()}
    if any(chosen.modality == "images" and chosen.encoder.preprocess.jpeg_draft
           and chosen.encoder.preprocess.jpeg_decoder == "simplejpeg" for chosen in sets):
        import simplejpeg

        versions["simplejpeg"] = simplejpeg.__version__
    return versions


def _vlmcache_version() -> str:
    from vlmcache import __version__

    return __version__


def extract(data: str | Path, out: str | Path, config: ExtractConfig | None = None, *, overwrite: bool = False,
            progress: bool = True, **options) -> ExtractResult:
    """Encode every image and caption of `data` once and write the cache folder `out`.

    `config` (or its fields as keyword `options`) says how. Re-running on a partly written cache
    resumes it (complete shards are kept); a complete cache with the same settings is left as it is.
    `tokens=True` on a complete set extracted without tokens adds token states to its shards and keeps
    their pooled features and every other dataset bit for bit (resumable in the same way).
    `overwrite=True` starts afresh, deleting only the files a cache consists of. See the module
    docstring for torchrun.
    """
    started = time.perf_counter()
    config = config or ExtractConfig(**options)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VlmcacheError(f"--out {out}: is a file; pass a folder path for the cache")
    dataset = datasets.load_dataset(data, config.format, config.images_dir, config.splits, config.limit,
                                    caption_key=config.caption_key, split_key=config.split_key,
                                    val_fraction=config.val_fraction, on_error=config.on_error,
                                    image_column=config.image_column, caption_column=config.caption_column)
    if dataset.num_images == 0:
        raise VlmcacheError(f"{data}: no images selected")
    check_out_folder(out, dataset)
    rank, world, torch_device = distributed.setup(encoders.pick_device(config.device))  # on CUDA: LOCAL_RANK's GPU
    backend = "torch" if config.tokens and config.backend == "auto" else config.backend
    fingerprint = dataset.fingerprint()
    sets = []  # one PendingSet per requested encoder; the first of each modality is the default set of a new cache
    for model in (config.image_model, *config.extra_image_models):  # each model's final output, then its --layers
        for encoder in encoders.load_image_encoders(model, config.image_layers, config.image_pooling,
                                                    str(torch_device), backend):
            encoder = encoders.set_decode(encoder, config.decode)
            sets.append(PendingSet("images", layer_set_name(model, encoder.layer), encoder, encoder.compute_path))
    for model in (config.text_model, *config.extra_text_models):
        for encoder in encoders.load_text_encoders(model, config.text_layers, config.text_pooling, str(torch_device),
                                                   config.max_length, backend):
            sets.append(PendingSet("texts", layer_set_name(model, encoder.layer), encoder,
                                   f"{encoder.compute_path}+length-sorted-batches"))
    for chosen in sets:
        chosen.provenance = json.loads(json.dumps(
            {"encoder": chosen.encoder.provenance(), "dataset_fingerprint": fingerprint, "dtype": config.dtype,
             "tokens": config.tokens, "shard_size": config.shard_size, "compute_path": chosen.compute_path}))
    defaults = {modality: next(c for c in sets if c.modality == modality) for modality in MODALITIES}
    manifest = {
        "format_version": FORMAT_VERSION,
        "status": "incomplete",
        "created": now_iso(),
        "dataset": {"format": dataset.format, "root": str(dataset.root), "fingerprint": fingerprint,
                    "images": dataset.num_images, "captions": dataset.num_captions,
                    "splits": dataset.split_counts(), "limit_per_split": config.limit,
                    **({"dropped_samples": dataset.dropped} if dataset.dropped else {})},
        "provenance": {modality: defaults[modality].provenance for modality in MODALITIES},
        "extract_config": asdict(config),
        "libraries": _library_versions(sets),
    }
    manifest = json.loads(json.dumps(manifest))  # plain JSON types, so it compares equal to a reloaded one

    with ExitStack() as stack:
        error = None
        if rank == 0:
            try:
                out.mkdir(parents=True, exist_ok=True)
                stack.enter_context(FolderLock(out, "extract"))
                prepare_cache(out, dataset, manifest, sets, overwrite)
            except VlmcacheError as failure:
                error = str(failure)
            except OSError as failure:
                error = f"--out {out}: cannot write the cache there ({failure.strerror})"
        distributed.share_error(error, world, DIST_RECOVERY)
        if world > 1:  # the other ranks learn each set's folder, status and provenance from rank 0's manifest
            shared = read_manifest(out / "manifest.json")
            _assign_folders(shared, sets)
            for chosen in sets:
                chosen.provenance = _recorded_provenance(shared, chosen)
        plans = {"images": shard_ranges(dataset.num_images, config.shard_size),
                 "texts": shard_ranges(dataset.num_captions, config.shard_size)}
        # A complete set with a shard gone (deleted after `vlmcache verify` named it bad) is worked on again.
        work = [c for c in sets if not c.complete or any(not (out / c.folder / shard_name(i)).exists()
                                                         for i in range(len(plans[c.modality])))]
        pending = {id(c): [i for i in range(len(plans[c.modality])) if shard_pending(out / c.folder / shard_name(i), c)]
                   for c in work}
        adding = {id(c): sum((out / c.folder / shard_name(i)).exists() for i in pending[id(c)]) for c in work}
        # every rank lists the pending shards before any rank rewrites one
        distributed.barrier(world, "listing the pending shards", DIST_RECOVERY)
        seconds = {"images": 0.0, "texts": 0.0}
        with make_progress(progress and rank == 0) as bars:
            for chosen in work:
                mine = [i for n, i in enumerate(pending[id(chosen)]) if n % world == rank]
                phase_started = time.perf_counter()
                run = _extract_images if chosen.modality == "images" else _extract_texts
                label = (f"{chosen.modality} {chosen.name}" if len(sets) > 2 else
                         {"images": "images", "texts": "captions"}[chosen.modality])
                run(out / chosen.folder, dataset, chosen.encoder, plans[chosen.modality], mine, chosen.provenance,
                    config, bars, f"adding tokens: {label}" if adding[id(chosen)] else label)
                seconds[chosen.modality] += time.perf_counter() - phase_started
        distributed.barrier(world, "waiting for every rank's shards", DIST_RECOVERY)
        written, added = sum(len(shards) for shards in pending.values()), sum(adding.values())
        result = ExtractResult(out, dataset.num_images, dataset.num_captions, written - added,
                               sum(len(plans[c.modality]) for c in sets) - written,
                               image_seconds=seconds["images"], text_seconds=seconds["texts"], shards_tokens_added=added)
        if rank == 0 and work:
            finalize_cache(out, manifest, plans, work, result)
        if rank == 0 and defaults["texts"].folder == "texts":  # also on a complete cache: rebuilds one it cannot trust
            save_query_encoder(out, defaults["texts"].encoder)
    result.seconds = time.perf_counter() - started
    return result


def _fail_or_record(on_error: str, what: str, reason: str) -> None:
    if on_error == "fail":
        raise VlmcacheError(f"{what}: {reason}; fix or remove it, or pass --on-error skip to record and skip it")


def _extract_images(folder: Path, dataset, encoder, plan, shards, provenance, config: ExtractConfig, bars,
                    label: str = "images"):
    if not shards:
        return
    batch_size, workers, tokens, on_error = config.batch_size, config.workers, config.tokens, config.on_error
    if workers is None:
        # On a CPU the forward pass needs the cores and one decoder keeps up; a GPU needs many decoders.
        workers = min(8, os.cpu_count() or 1) if encoder.device.type == "cuda" else 1
    batches = [list(range(start, min(start + batch_size, plan[i][1])))
               for i in shards for start in range(plan[i][0], plan[i][1], batch_size)]
    loader = torch.utils.data.DataLoader(
        _ImageRows(dataset.image_paths, encoder.preprocess), batch_sampler=batches, num_workers=workers,
        collate_fn=_collate, worker_init_fn=_single_thread_worker, pin_memory=encoder.device.type == "cuda")
    task = bars.add_task(label, total=sum(plan[i][1] - plan[i][0] for i in shards), unit="img")
    batch_iter = iter(loader)
    for position, index in enumerate(shards):
        start, stop = plan[index]
        rows = stop - start
        features = np.zeros((rows, encoder.dim), np.float32)
        valid, errors = np.ones(rows, bool), [""] * rows
        token_parts, mask_parts = [], []
        done = 0
        while done < rows:
            batch_rows, pixels, batch_errors = next(batch_iter)
            for row, reason in zip(batch_rows, batch_errors, strict=True):
                if reason:
                    _fail_or_record(on_error, f"image {dataset.image_paths[row]}", reason)
                    valid[row - start], errors[row - start] = False, reason
            encoded = encoder.encode(pixels, tokens)
            features[done:done + len(batch_rows)] = encoded.pooled.numpy()
            if tokens:
                token_parts.append(encoded.tokens.numpy())
                mask_parts.append(encoded.mask.numpy())
            done += len(batch_rows)
            bars.advance(task, len(batch_rows))
        features[~valid] = 0.0  # a skipped image's row holds zeros, never the features of a blank input
        arrays = {"features": features, "valid": valid, "error": errors}
        if tokens:
            arrays["tokens"], arrays["token_mask"] = np.concatenate(token_parts), np.concatenate(mask_parts)
        write_or_extend_shard(folder / shard_name(index), start, provenance, arrays, len(shards) - position)


def _extract_texts(folder: Path, dataset, encoder, plan, shards, provenance, config: ExtractConfig, bars,
                   label: str = "captions"):
    if not shards:
        return
    batch_size, tokens, on_error = config.text_batch_size, config.tokens, config.on_error
    task = bars.add_task(label, total=sum(plan[i][1] - plan[i][0] for i in shards), unit="cap")
    for position, index in enumerate(shards):
        start, stop = plan[index]
        texts = dataset.captions[start:stop]
        rows = len(texts)
        valid, errors = np.ones(rows, bool), [""] * rows
        for offset, text in enumerate(texts):
            if not text.strip():
                image = dataset.image_ids[dataset.caption_image[start + offset]]
                _fail_or_record(on_error, f"caption row {start + offset} (image {image})", "empty caption")
                valid[offset], errors[offset] = False, "empty caption"
        lengths = np.asarray(encoder.token_lengths([t if t.strip() else "." for t in texts]))
        # Length-sorted batches waste less compute on padding; results go back to row order below.
        order = np.argsort(lengths, kind="stable")
        features = np.zeros((rows, encoder.dim), np.float32)
        token_array = np.zeros((rows, encoder.max_length, encoder.dim), np.float32) if tokens else None
        mask_array = np.zeros((rows, encoder.max_length), bool) if tokens else None
        for begin in range(0, rows, batch_size):
            chosen = order[begin:begin + batch_size]
            encoded = encoder.encode([texts[i] if valid[i] else "." for i in chosen], tokens)
            features[chosen] = encoded.pooled.numpy()
            if tokens:
                token_array[chosen], mask_array[chosen] = encoded.tokens.numpy(), encoded.mask.numpy()
            bars.advance(task, len(chosen))
        features[~valid] = 0.0
        arrays = {"features": features, "valid": valid, "error": errors, "truncated": lengths > encoder.max_length}
        if tokens:
            arrays["tokens"], arrays["token_mask"] = token_array, mask_array
        write_or_extend_shard(folder / shard_name(index), start, provenance, arrays, len(shards) - position)


def save_query_encoder(out: Path, encoder: encoders.TextEncoder) -> None:
    """Keep the text encoder's ONNX export and its tokenizer in the cache, with their SHA-256, when this extract
    made an export and the cache has none it can trust (see vlmcache.cache.query_encoder).

    Queries and prompts are then encoded with `tokenizers` + ONNX Runtime (vlmcache.encode.prompts), which
    starts in a fraction of the time that importing transformers takes.
    """
    if encoder.onnx_model is None or not getattr(encoder.tokenizer, "is_fast", False) or \
            not query_encoder.needs_writing(out):
        return
    query_encoder.write(out, encoder.onnx_model, encoder.tokenizer.backend_tokenizer.to_str(), {
        "weights_sha256": encoder.weights_sha256, "max_length": encoder.max_length, "pooling": encoder.pooling,
        "pad_id": encoder.tokenizer.pad_token_id, "pad_token": encoder.tokenizer.pad_token})
