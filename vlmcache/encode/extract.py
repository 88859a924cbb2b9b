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
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from vlmcache.cache.layout import MODALITIES, layer_set_name, set_name
from vlmcache.cache.store import FORMAT_VERSION, now_iso, shard_name, shard_ranges
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
from vlmcache.data.datasets import ON_ERROR
from vlmcache.encode import encoders
from vlmcache.errors import VlmcacheError
from vlmcache.files import FolderLock, atomic_write, write_json_atomic, write_text_atomic
from vlmcache.progress import make_progress

DTYPES = ("float16", "float32")


MAX_WORKERS = 64


@dataclass
class ExtractConfig:
    """How to extract: encoders, dataset reading, storage and compute options (recorded in the manifest)."""

    image_model: str = encoders.DEFAULT_IMAGE_MODEL
    text_model: str = encoders.DEFAULT_TEXT_MODEL
    # Further encoders: each becomes a feature set of its own in the same cache (see vlmcache.cache.store).
    extra_image_models: tuple[str, ...] = ()
    extra_text_models: tuple[str, ...] = ()
    # Further layers of every image / text encoder (-2, block5, l4, ...): each a feature set NAME:LAYER of its own.
    image_layers: tuple[str, ...] = ()
    text_layers: tuple[str, ...] = ()
    image_pooling: str | None = None
    text_pooling: str | None = None
    format: str = "auto"
    images_dir: str | None = None
    splits: list[str] | None = None
    limit: int | None = None
    shard_size: int = 1024
    dtype: str = "float16"
    batch_size: int = 64
    text_batch_size: int = 256
    max_length: int = 64
    workers: int | None = None
    device: str = "auto"
    tokens: bool = False
    on_error: str = "fail"
    backend: str = "auto"
    caption_key: str | None = None  # webdataset shards: the caption field of each sample's .json
    split_key: str = "split"  # webdataset shards: the split field of each sample's .json
    val_fraction: float | None = None  # webdataset shards: carve this fraction as val (fixed seed) instead

    def __post_init__(self):
        if self.on_error not in ON_ERROR:
            raise VlmcacheError(f"--on-error {self.on_error}: use fail or skip")
        if self.dtype not in DTYPES:
            raise VlmcacheError(f"--dtype {self.dtype}: use float16 or float32")
        for option, value, low, high in (("shard-size", self.shard_size, 1, 1 << 22),
                                         ("batch-size", self.batch_size, 1, 1 << 16),
                                         ("text-batch-size", self.text_batch_size, 1, 1 << 16),
                                         ("max-length", self.max_length, 1, 8192),
                                         ("workers", self.workers, 0, MAX_WORKERS), ("limit", self.limit, 1, 1 << 40)):
            if value is not None and not low <= value <= high:
                raise VlmcacheError(f"--{option} {value}: must be between {low} and {high}")
        if self.images_dir is not None:
            self.images_dir = str(self.images_dir)
        self.extra_image_models, self.extra_text_models = tuple(self.extra_image_models), tuple(self.extra_text_models)
        self.image_layers, self.text_layers = tuple(map(str, self.image_layers)), tuple(map(str, self.text_layers))
        for modality, models in (("image", (self.image_model, *self.extra_image_models)),
                                 ("text", (self.text_model, *self.extra_text_models))):
            names = [set_name(model) for model in models]
            if len(set(names)) != len(names):
                raise VlmcacheError(f"--{modality}-model: {', '.join(models)} name the same feature set twice; "
                                    "give each encoder once")
        if self.tokens and self.backend == "onnxruntime":
            raise VlmcacheError("--tokens needs --backend torch or eager (the ONNX export gives pooled features only)")


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
    rank, world = _distributed()
    dataset = datasets.load_dataset(data, config.format, config.images_dir, config.splits, config.limit,
                                    caption_key=config.caption_key, split_key=config.split_key,
                                    val_fraction=config.val_fraction, on_error=config.on_error)
    if dataset.num_images == 0:
        raise VlmcacheError(f"{data}: no images selected")
    check_out_folder(out, dataset)
    torch_device = encoders.pick_device(config.device)
    if torch_device.type == "cuda" and world > 1:
        torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    backend = "torch" if config.tokens and config.backend == "auto" else config.backend
    fingerprint = dataset.fingerprint()
    sets = []  # one PendingSet per requested encoder; the first of each modality is the default set of a new cache
    for model in (config.image_model, *config.extra_image_models):  # each model's final output, then its --layers
        for encoder in encoders.load_image_encoders(model, config.image_layers, config.image_pooling,
                                                    str(torch_device), backend):
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
        "libraries": _library_versions(),
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
        _share_error(error, world)
        if world > 1:  # the other ranks learn each set's folder, status and provenance from rank 0's manifest
            shared = json.loads((out / "manifest.json").read_text())
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
        _barrier(world)  # every rank lists the pending shards before any rank rewrites one
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
        _barrier(world)
        written, added = sum(len(shards) for shards in pending.values()), sum(adding.values())
        result = ExtractResult(out, dataset.num_images, dataset.num_captions, written - added,
                               sum(len(plans[c.modality]) for c in sets) - written,
                               image_seconds=seconds["images"], text_seconds=seconds["texts"], shards_tokens_added=added)
        if rank == 0 and work:
            finalize_cache(out, manifest, plans, work, result)
            if defaults["texts"].folder == "texts":
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
        write_or_extend_shard(folder / shard_name(index), start, provenance, arrays)


def _extract_texts(folder: Path, dataset, encoder, plan, shards, provenance, config: ExtractConfig, bars,
                   label: str = "captions"):
    if not shards:
        return
    batch_size, tokens, on_error = config.text_batch_size, config.tokens, config.on_error
    task = bars.add_task(label, total=sum(plan[i][1] - plan[i][0] for i in shards), unit="cap")
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
        write_or_extend_shard(folder / shard_name(index), start, provenance, arrays)


def save_query_encoder(out: Path, encoder: encoders.TextEncoder) -> None:
    """Keep the text encoder's ONNX export and its tokenizer in the cache, when this extract made one.

    Queries and prompts are then encoded with `tokenizers` + ONNX Runtime (vlmcache.encode.prompts), which
    starts in a fraction of the time that importing transformers takes.
    """
    if encoder.onnx_model is None or not getattr(encoder.tokenizer, "is_fast", False) or (out / "text-encoder.json").exists():
        return
    with atomic_write(out / "text-encoder.onnx") as temporary:
        temporary.write_bytes(encoder.onnx_model)
    write_text_atomic(out / "text-tokenizer.json", encoder.tokenizer.backend_tokenizer.to_str())
    write_json_atomic(out / "text-encoder.json", {  # written last: its presence says the other two are whole
        "weights_sha256": encoder.weights_sha256, "max_length": encoder.max_length, "pooling": encoder.pooling,
        "pad_id": encoder.tokenizer.pad_token_id, "pad_token": encoder.tokenizer.pad_token})

