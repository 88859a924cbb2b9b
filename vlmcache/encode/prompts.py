"""Frozen text features of prompts and queries that are not in a cache, encoded once and kept.

The text encoder is the one the cache recorded (its weights hash is checked), loaded once per process
and kept. Encoded prompts are appended to `<cache>/prompt-features-<encoder id>.bin`, a flat file of
fixed-size records (32-byte key, float32 features, 8-byte check: the start of the SHA-256 of the rest):
appending never rewrites what is there, a record cut short by a kill or whose check fails is ignored on the
next read (its prompt is encoded again), and the file stops growing at `max_rows` prompts.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from vlmcache.cache import query_encoder
from vlmcache.errors import VlmcacheError

if TYPE_CHECKING:  # imported on first use: the one-off search path must start without PyTorch
    from vlmcache.encode.encoders import TextEncoder

MAX_ROWS = 20_000  # ~30 MB for 384-d features; past it, new prompts are encoded but not kept
CHECK = 8  # bytes of SHA-256 closing each record
# Part of the file's name (its encoder id): a file of records laid out otherwise (before the check) is never read.
RECORD_LAYOUT = b"key32+features+check8"


class PromptStore:
    """Prompt → frozen text features for one text encoder, with an append-only file beside the cache.

    Safe to share between threads (the web page's workers): the encoder is loaded once, and the kept
    prompts and the file change one writer at a time.
    """

    def __init__(self, provenance: dict, folder: Path | None, max_rows: int = MAX_ROWS):
        self.provenance, self.max_rows = provenance, max_rows
        # A layer's features differ from the final output's: its name joins the identity (only when there is
        # one, so the stores of existing caches keep their keys).
        self._identity = (provenance["weights_sha256"] + provenance["pooling"] + str(provenance.get("max_length"))
                          + (f":{provenance['layer']}" if provenance.get("layer") else "")).encode()
        encoder_id = hashlib.sha256(self._identity + RECORD_LAYOUT).hexdigest()[:16]
        self.folder = folder
        self.path = folder / f"prompt-features-{encoder_id}.bin" if folder is not None else None
        self.record = np.dtype([("key", "S32"), ("features", "<f4", (int(provenance["dim"]),)), ("check", f"S{CHECK}")])
        self.known: dict[bytes, np.ndarray] = {}
        self._encoder: TextEncoder | OnnxTextEncoder | None = None
        self._lock = threading.Lock()
        if self.path is not None and self.path.is_file():
            self.known = self._intact_records(self.path.read_bytes())

    def _intact_records(self, raw: bytes) -> dict[bytes, np.ndarray]:
        """Features by key of a store file's records, leaving out a tail cut short and any record whose check fails."""
        size = self.record.itemsize
        rows = np.frombuffer(raw[:len(raw) - len(raw) % size], dtype=self.record)[:self.max_rows]
        known = {}
        for number, row in enumerate(rows):
            record = raw[number * size:(number + 1) * size]
            if _check(record[:-CHECK]) == record[-CHECK:]:  # as bytes: numpy strips an "S" field's trailing NULs
                known[record[:32]] = row["features"]
        return known

    def key(self, prompt: str) -> bytes:
        return hashlib.sha256(self._identity + b"\0" + prompt.encode("utf-8", "surrogatepass")).digest()

    @property
    def encoder(self) -> TextEncoder | OnnxTextEncoder:
        """The frozen text encoder, loaded on first use and kept: the cache's saved ONNX export when it has one
        (starts in well under a second), else the model itself through transformers and PyTorch (exporting
        it to ONNX for a few prompts would cost more than it saves)."""
        if self.provenance.get("max_length") is None:  # imported or synthetic text features: no model made them
            raise VlmcacheError(f"text features of {self.provenance['name']}: not made by a text encoder vlmcache can "
                                "run; new prompts and queries need one: use a cache made by vlmcache extract")
        if self._encoder is None:
            with self._lock:  # concurrent first requests: one loads, the others wait for it
                if self._encoder is None:
                    self._encoder = self._load_encoder()
        return self._encoder

    def _load_encoder(self) -> TextEncoder | OnnxTextEncoder:
        saved = OnnxTextEncoder.from_cache(self.folder, self.provenance)
        if saved is not None:
            return saved
        from vlmcache.encode.encoders import text_encoder_from_provenance

        return text_encoder_from_provenance(self.provenance, "cpu", backend="torch")

    def encode(self, prompts: list[str], batch_size: int = 256) -> np.ndarray:
        """(len(prompts), dim) float32 frozen text features; only unseen prompts run the encoder."""
        missing = [prompt for prompt in dict.fromkeys(prompts) if self.key(prompt) not in self.known]
        fresh: dict[bytes, np.ndarray] = {}
        for start in range(0, len(missing), batch_size):
            batch = missing[start:start + batch_size]
            features = np.asarray(self.encoder.encode(batch).pooled, dtype=np.float32)
            fresh.update({self.key(prompt): row for prompt, row in zip(batch, features, strict=True)})
        self._keep(fresh)
        return np.stack([fresh[key] if key in fresh else self.known[key] for key in map(self.key, prompts)])

    def _keep(self, fresh: dict[bytes, np.ndarray]) -> None:
        with self._lock:  # two appends at once could interleave, and the room left must be counted once
            self._append(fresh)

    def _append(self, fresh: dict[bytes, np.ndarray]) -> None:
        fresh = {key: row for key, row in fresh.items() if key not in self.known}  # another thread kept it meanwhile
        room = self.max_rows - len(self.known)
        kept = dict(list(fresh.items())[:max(0, room)])
        self.known.update(kept)
        if not kept or self.path is None or not os.access(self.path.parent, os.W_OK):
            return
        rows = np.zeros(len(kept), dtype=self.record)
        rows["key"], rows["features"] = list(kept), np.stack(list(kept.values()))
        raw = rows.tobytes()
        rows["check"] = [_check(raw[start:start + self.record.itemsize - CHECK])
                         for start in range(0, len(raw), self.record.itemsize)]
        # One write of whole records in append mode: other readers see whole records or a short tail they skip.
        try:
            with open(self.path, "ab") as handle:
                torn = handle.tell() % self.record.itemsize  # a record cut short by a kill: drop it, else every
                if torn:                                     # record appended after it would be read misaligned
                    handle.truncate(handle.tell() - torn)
                handle.write(rows.tobytes())
        except OSError:  # a full disk: the prompts are answered, only not kept (a torn tail is dropped next time)
            return


def _check(record: bytes) -> bytes:
    return hashlib.sha256(record).digest()[:CHECK]


class OnnxTextEncoder:
    """A cache's saved text encoder: `tokenizers` + ONNX Runtime, pooled features as at extraction."""

    def __init__(self, session, tokenizer):
        self.session, self.tokenizer = session, tokenizer

    @classmethod
    def from_cache(cls, folder: Path | None, provenance: dict) -> OnnxTextEncoder | None:
        """The saved encoder if `folder` holds one made from the same weights and settings whose files match the
        SHA-256 recorded for them (see vlmcache.cache.query_encoder), else None. Files that differ from their
        hashes, or that the libraries cannot load, are refused in one line naming the file."""
        record = query_encoder.read_record(folder) if folder is not None else None
        # The saved export is of the final output: a layer's provenance (with "layer") never matches it.
        if not query_encoder.is_vouched_for(record) or any(
                record.get(key) != provenance.get(key) for key in ("weights_sha256", "max_length", "pooling", "layer")):
            return None
        try:
            import onnxruntime  # noqa: F401  (only whether it is installed: onnx_session imports it)
            from tokenizers import Tokenizer
        except ImportError:
            return None
        model, tokenizer_json = query_encoder.read_files(folder, record)
        try:
            tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception for any malformed file
            raise VlmcacheError(f"{folder / query_encoder.TOKENIZER}: not a tokenizer file tokenizers can load "
                                f"({str(error)[:200]}); {query_encoder.HINT}") from None
        tokenizer.enable_truncation(record["max_length"])
        tokenizer.enable_padding(pad_id=record["pad_id"], pad_token=record["pad_token"])
        return cls(onnx_session(model, folder / query_encoder.MODEL, query_encoder.HINT, threads=4), tokenizer)

    def encode(self, texts: list[str]) -> SimpleNamespace:
        """Texts -> SimpleNamespace(pooled=(N, dim) float32 array), like TextEncoder.encode."""
        batch = self.tokenizer.encode_batch(texts)
        ids = np.asarray([item.ids for item in batch], dtype=np.int64)
        mask = np.asarray([item.attention_mask for item in batch], dtype=np.int64)
        return SimpleNamespace(pooled=self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0])


def onnx_session(model: bytes, path: Path, hint: str, threads: int | None = None):
    """An ONNX Runtime CPU session of a model vlmcache saved (`path` names where it came from): the one reader of
    ONNX files. A model ONNX Runtime cannot load is refused in one line naming the file and what to do (`hint`)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = min(threads, os.cpu_count() or 1)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not spin
    try:
        return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - ONNX Runtime's errors (InvalidProtobuf, Fail...) are bare Exceptions
        raise VlmcacheError(f"{path}: not a model ONNX Runtime can load ({str(error)[:200]}); {hint}") from None


def prompt_folder(meta: dict) -> Path | None:
    """Where a checkpoint's prompt store lives: the cache its text features came from (None if gone)."""
    folder = Path(meta.get("text_cache") or meta["cache"])
    return folder if folder.is_dir() else None
