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
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from vlmcache import datasets, encoders
from vlmcache.errors import VlmcacheError
from vlmcache.progress import make_progress
from vlmcache.store import (
    FORMAT_VERSION,
    MODALITIES,
    CacheLock,
    differences,
    now_iso,
    shard_name,
    shard_ranges,
    write_index,
    write_json_atomic,
    write_shard,
)

ON_ERROR = ("fail", "skip")


@dataclass
class ExtractResult:
    """What an extract did: where the cache is, its size, what was skipped, how long it took."""

    path: Path
    images: int
    captions: int
    shards_written: int
    shards_reused: int
    skipped: list[dict] = field(default_factory=list)
    truncated_captions: int = 0
    seconds: float = 0.0
    image_seconds: float = 0.0  # wall time of the image pass (decode + forward + write), this process
    text_seconds: float = 0.0


class _ImageRows(torch.utils.data.Dataset):
    """Decodes and preprocesses one image row; runs in DataLoader workers. Errors become a reason string."""

    def __init__(self, paths: list[str], preprocess: encoders.Preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int):
        try:
            return row, torch.from_numpy(self.preprocess(datasets.load_rgb(self.paths[row]))), ""
        except datasets.ImageDecodeError as error:
            size = self.preprocess.size
            return row, torch.zeros(3, size, size), str(error)


def _single_thread_worker(_: int) -> None:
    # Decoders are separate processes; their own torch thread pools would fight the forward pass for cores.
    torch.set_num_threads(1)


def _collate(items):
    rows, pixels, errors = zip(*items, strict=True)
    return list(rows), torch.stack(pixels), list(errors)


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the torchrun process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return int(os.environ.get("RANK", "0")), world


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _share_error(message: str | None, world: int) -> None:
    """Rank 0's preparation error (or None) raised on every rank, so no rank waits forever."""
    if world > 1:
        box = [message]
        torch.distributed.broadcast_object_list(box, src=0)
        message = box[0]
    if message:
        raise VlmcacheError(message)


def _library_versions() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "h5py": h5py.__version__, "numpy": np.__version__, "vlmcache": _vlmcache_version()}


def _vlmcache_version() -> str:
    from vlmcache import __version__

    return __version__


def extract(
    data: str | Path,
    out: str | Path,
    *,
    image_model: str = encoders.DEFAULT_IMAGE_MODEL,
    text_model: str = encoders.DEFAULT_TEXT_MODEL,
    image_pooling: str | None = None,
    text_pooling: str | None = None,
    format: str = "auto",
    images_dir: str | Path | None = None,
    splits: list[str] | None = None,
    limit: int | None = None,
    shard_size: int = 1024,
    dtype: str = "float16",
    batch_size: int = 64,
    text_batch_size: int = 256,
    max_length: int = 64,
    workers: int | None = None,
    device: str = "auto",
    tokens: bool = False,
    on_error: str = "fail",
    overwrite: bool = False,
    backend: str = "auto",
    progress: bool = True,
    caption_key: str | None = None,
    split_key: str = "split",
    val_fraction: float | None = None,
) -> ExtractResult:
    """Encode every image and caption of `data` once and write the cache folder `out`.

    Re-running on a partly written cache resumes it (complete shards are kept); a complete cache with
    the same settings is left as it is. `overwrite=True` starts afresh. `backend` picks how the encoders
    run (see encoders.load_image_encoder); token features always come from torch. `on_error="skip"`
    records bad images/captions in the manifest instead of stopping. `caption_key`, `split_key` and
    `val_fraction` apply to webdataset shards (see datasets.load_dataset). See the module docstring for torchrun.
    """
    started = time.perf_counter()
    if on_error not in ON_ERROR:
        raise VlmcacheError(f"--on-error {on_error}: use fail or skip")
    if dtype not in ("float16", "float32"):
        raise VlmcacheError(f"--dtype {dtype}: use float16 or float32")
    if shard_size < 1 or batch_size < 1 or text_batch_size < 1:
        raise VlmcacheError("--shard-size and batch sizes must be positive")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VlmcacheError(f"--out {out}: is a file; pass a folder path for the cache")
    rank, world = _distributed()
    dataset = datasets.load_dataset(data, format, images_dir, splits, limit, caption_key=caption_key,
                                    split_key=split_key, val_fraction=val_fraction, on_error=on_error)
    if dataset.num_images == 0:
        raise VlmcacheError(f"{data}: no images selected")
    torch_device = encoders.pick_device(device)
    if torch_device.type == "cuda" and world > 1:
        torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if tokens and backend == "onnxruntime":
        raise VlmcacheError("--tokens needs --backend torch or eager (the ONNX export gives pooled features only)")
    backend = "torch" if tokens and backend == "auto" else backend
    image_encoder = encoders.load_image_encoder(image_model, image_pooling, str(torch_device), backend)
    text_encoder = encoders.load_text_encoder(text_model, text_pooling, str(torch_device), max_length, backend)
    fingerprint = dataset.fingerprint()
    provenance = {
        modality: {"encoder": encoder.provenance(), "dataset_fingerprint": fingerprint, "dtype": dtype,
                   "tokens": tokens, "shard_size": shard_size, "compute_path": path}
        for modality, encoder, path in (("images", image_encoder, image_encoder.compute_path),
                                        ("texts", text_encoder, f"{text_encoder.compute_path}+length-sorted-batches"))
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "status": "incomplete",
        "created": now_iso(),
        "dataset": {"format": dataset.format, "root": str(dataset.root), "fingerprint": fingerprint,
                    "images": dataset.num_images, "captions": dataset.num_captions,
                    "splits": dataset.split_counts(), "limit_per_split": limit,
                    **({"dropped_samples": dataset.dropped} if dataset.dropped else {})},
        "provenance": provenance,
        "libraries": _library_versions(),
    }
    manifest = json.loads(json.dumps(manifest))  # plain JSON types, so it compares equal to a reloaded one

    lock = CacheLock(out) if rank == 0 else None
    error = None
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock.__enter__()
            prepare_cache(out, dataset, manifest, overwrite)
        except VlmcacheError as failure:
            error = str(failure)
    try:
        _share_error(error, world)
        plans = {"images": shard_ranges(dataset.num_images, shard_size),
                 "texts": shard_ranges(dataset.num_captions, shard_size)}
        pending = {m: [i for i, _ in enumerate(plans[m]) if not (out / m / shard_name(i)).exists()] for m in MODALITIES}
        mine = {m: [i for n, i in enumerate(pending[m]) if n % world == rank] for m in MODALITIES}
        with make_progress(progress and rank == 0) as bars:
            phase_started = time.perf_counter()
            _extract_images(out, dataset, image_encoder, plans["images"], mine["images"], provenance["images"],
                            batch_size, workers, tokens, on_error, bars)
            image_seconds = time.perf_counter() - phase_started
            _extract_texts(out, dataset, text_encoder, plans["texts"], mine["texts"], provenance["texts"],
                           text_batch_size, tokens, on_error, bars)
            text_seconds = time.perf_counter() - phase_started - image_seconds
        _barrier(world)
        reused = sum(len(plans[m]) - len(pending[m]) for m in MODALITIES)
        result = ExtractResult(out, dataset.num_images, dataset.num_captions,
                               sum(len(pending[m]) for m in MODALITIES), reused,
                               image_seconds=image_seconds, text_seconds=text_seconds)
        if rank == 0:
            finalize_cache(out, manifest, plans, result)
    finally:
        if lock is not None:
            lock.__exit__()
    result.seconds = time.perf_counter() - started
    return result


def prepare_cache(out: Path, dataset: datasets.PairDataset, manifest: dict, overwrite: bool) -> None:
    """Check an existing cache is the same job (or wipe it with overwrite); write index and manifest."""
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not overwrite:
        old = json.loads(manifest_path.read_text())
        complete = old.get("status") == "complete"
        differing = [path for path in differences({k: old.get(k, {}) for k in ("dataset", "provenance")},
                                                  {k: manifest[k] for k in ("dataset", "provenance")})
                     # The same data may be reached by another path; and a complete cache made by another
                     # backend holds the same features (within float rounding) and is kept as it is. An
                     # incomplete one must resume on its own backend, so no cache mixes two.
                     if path != "dataset.root" and not (complete and path.endswith(".compute_path"))]
        if differing:
            hint = (f" (or --backend as before: {old['provenance']['images'].get('compute_path')})"
                    if all(path.endswith(".compute_path") for path in differing) else "")
            raise VlmcacheError(f"{out}: already holds a cache made differently ({', '.join(differing[:4])}); "
                                f"pass --overwrite to replace it{hint}, or choose another --out")
        if complete:
            manifest.update(old)
            return
    elif overwrite:
        for child in ("images", "texts", "index.h5", "manifest.json"):
            target = out / child
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    for modality in MODALITIES:
        (out / modality).mkdir(exist_ok=True)
        for leftover in (out / modality).glob(".shard-*.tmp-*"):  # half shards of a killed run
            leftover.unlink()
    if not (out / "index.h5").exists():
        write_index(out / "index.h5", dataset)
    write_json_atomic(manifest_path, manifest)


def _fail_or_record(on_error: str, what: str, reason: str) -> None:
    if on_error == "fail":
        raise VlmcacheError(f"{what}: {reason}; fix or remove it, or pass --on-error skip to record and skip it")


def _extract_images(out, dataset, encoder, plan, shards, provenance, batch_size, workers, tokens, on_error, bars):
    if not shards:
        return
    if workers is None:
        # On a CPU the forward pass needs the cores and one decoder keeps up; a GPU needs many decoders.
        workers = min(8, os.cpu_count() or 1) if encoder.device.type == "cuda" else 1
    batches = [list(range(start, min(start + batch_size, plan[i][1])))
               for i in shards for start in range(plan[i][0], plan[i][1], batch_size)]
    loader = torch.utils.data.DataLoader(
        _ImageRows(dataset.image_paths, encoder.preprocess), batch_sampler=batches, num_workers=workers,
        collate_fn=_collate, worker_init_fn=_single_thread_worker, pin_memory=encoder.device.type == "cuda")
    task = bars.add_task("images", total=sum(plan[i][1] - plan[i][0] for i in shards), unit="img")
    batch_iter = iter(loader)
    for index in shards:
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
        write_shard(out / "images" / shard_name(index), start, provenance, arrays, provenance["dtype"])


def _extract_texts(out, dataset, encoder, plan, shards, provenance, batch_size, tokens, on_error, bars):
    if not shards:
        return
    task = bars.add_task("captions", total=sum(plan[i][1] - plan[i][0] for i in shards), unit="cap")
    for index in shards:
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
        write_shard(out / "texts" / shard_name(index), start, provenance, arrays, provenance["dtype"])


def finalize_cache(out: Path, manifest: dict, plans: dict, result: ExtractResult) -> None:
    """Gather skipped items and truncation from the shards; mark the manifest complete."""
    shards, skipped, truncated = {}, [], 0
    with h5py.File(out / "index.h5", "r") as index:
        ids = {"images": index["image_id"].asstr(), "texts": index["caption"].asstr()}
        for modality in MODALITIES:
            shards[modality] = []
            for number, (start, stop) in enumerate(plans[modality]):
                path = out / modality / shard_name(number)
                if not path.exists():
                    raise VlmcacheError(f"{path}: shard missing after extraction; run the same extract again")
                with h5py.File(path, "r") as shard:
                    # A skipped row is always marked invalid; reading only those rows' strings keeps a
                    # million-row cache from decoding two million strings here.
                    for offset in np.flatnonzero(~shard["valid"][()].astype(bool)).tolist():
                        skipped.append({"modality": modality, "row": start + offset,
                                        "item": str(ids[modality][start + offset]),
                                        "reason": shard["error"].asstr()[offset]})
                    if "truncated" in shard:
                        truncated += int(shard["truncated"][()].sum())
                shards[modality].append({"file": shard_name(number), "row_start": start, "rows": stop - start})
    manifest.update({"status": "complete", "finished": now_iso(), "shards": shards, "skipped": skipped,
                     "truncated_captions": truncated})
    write_json_atomic(out / "manifest.json", manifest)
    result.skipped, result.truncated_captions = skipped, truncated
