"""Frozen text features of prompts and queries that are not in a cache, encoded once and kept.

The text encoder is the one the cache recorded (its weights hash is checked), loaded once per process
and kept. Encoded prompts are appended to `<cache>/prompt-features-<encoder id>.bin`, a flat file of
fixed-size records (32-byte key, float32 features): appending never rewrites what is there, a record
cut short by a kill is ignored on the next read, and the file stops growing at `max_rows` prompts.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported on first use: the one-off search path must start without PyTorch
    from vlmcache.encode.encoders import TextEncoder

MAX_ROWS = 20_000  # ~30 MB for 384-d features; past it, new prompts are encoded but not kept


class PromptStore:
    """Prompt → frozen text features for one text encoder, with an append-only file beside the cache."""

    def __init__(self, provenance: dict, folder: Path | None, max_rows: int = MAX_ROWS):
        self.provenance, self.max_rows = provenance, max_rows
        # A layer's features differ from the final output's: its name joins the identity (only when there is
        # one, so the stores of existing caches keep their keys).
        self._identity = (provenance["weights_sha256"] + provenance["pooling"] + str(provenance["max_length"])
                          + (f":{provenance['layer']}" if provenance.get("layer") else "")).encode()
        encoder_id = hashlib.sha256(self._identity).hexdigest()[:16]
        self.folder = folder
        self.path = folder / f"prompt-features-{encoder_id}.bin" if folder is not None else None
        self.record = np.dtype([("key", "S32"), ("features", "<f4", (int(provenance["dim"]),))])
        self.known: dict[bytes, np.ndarray] = {}
        self._encoder: TextEncoder | OnnxTextEncoder | None = None
        if self.path is not None and self.path.is_file():
            raw = self.path.read_bytes()
            rows = np.frombuffer(raw[:len(raw) - len(raw) % self.record.itemsize], dtype=self.record)
            self.known = {bytes(row["key"]): row["features"] for row in rows[:max_rows]}

    def key(self, prompt: str) -> bytes:
        return hashlib.sha256(self._identity + b"\0" + prompt.encode("utf-8", "surrogatepass")).digest()

    @property
    def encoder(self) -> TextEncoder | OnnxTextEncoder:
        """The frozen text encoder, loaded on first use and kept: the cache's saved ONNX export when it has one
        (starts in well under a second), else the model itself through transformers and PyTorch (exporting
        it to ONNX for a few prompts would cost more than it saves)."""
        if self._encoder is None:
            self._encoder = OnnxTextEncoder.from_cache(self.folder, self.provenance)
        if self._encoder is None:
            from vlmcache.encode.encoders import text_encoder_from_provenance

            self._encoder = text_encoder_from_provenance(self.provenance, "cpu", backend="torch")
        return self._encoder

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
        room = self.max_rows - len(self.known)
        kept = dict(list(fresh.items())[:max(0, room)])
        self.known.update(kept)
        if not kept or self.path is None or not os.access(self.path.parent, os.W_OK):
            return
        rows = np.zeros(len(kept), dtype=self.record)
        rows["key"], rows["features"] = list(kept), np.stack(list(kept.values()))
        # One write of whole records in append mode: other readers see whole records or a short tail they skip.
        with open(self.path, "ab") as handle:
            torn = handle.tell() % self.record.itemsize  # a record cut short by a kill: drop it, else every
            if torn:                                     # record appended after it would be read misaligned
                handle.truncate(handle.tell() - torn)
            handle.write(rows.tobytes())


class OnnxTextEncoder:
    """A cache's saved text encoder: `tokenizers` + ONNX Runtime, pooled features as at extraction."""

    def __init__(self, session, tokenizer):
        self.session, self.tokenizer = session, tokenizer

    @classmethod
    def from_cache(cls, folder: Path | None, provenance: dict) -> OnnxTextEncoder | None:
        """The saved encoder if `folder` holds one made from the same weights and settings, else None."""
        if folder is None or not (folder / "text-encoder.json").is_file():
            return None
        try:
            import onnxruntime
            from tokenizers import Tokenizer
        except ImportError:
            return None
        saved = json.loads((folder / "text-encoder.json").read_text())
        # The saved export is of the final output: a layer's provenance (with "layer") never matches it.
        if any(saved.get(key) != provenance.get(key) for key in ("weights_sha256", "max_length", "pooling", "layer")):
            return None
        tokenizer = Tokenizer.from_file(str(folder / "text-tokenizer.json"))
        tokenizer.enable_truncation(saved["max_length"])
        tokenizer.enable_padding(pad_id=saved["pad_id"], pad_token=saved["pad_token"])
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = min(4, os.cpu_count() or 1)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not spin
        session = onnxruntime.InferenceSession(str(folder / "text-encoder.onnx"), options,
                                               providers=["CPUExecutionProvider"])
        return cls(session, tokenizer)

    def encode(self, texts: list[str]) -> SimpleNamespace:
        """Texts -> SimpleNamespace(pooled=(N, dim) float32 array), like TextEncoder.encode."""
        batch = self.tokenizer.encode_batch(texts)
        ids = np.asarray([item.ids for item in batch], dtype=np.int64)
        mask = np.asarray([item.attention_mask for item in batch], dtype=np.int64)
        return SimpleNamespace(pooled=self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0])


def prompt_folder(meta: dict) -> Path | None:
    """Where a checkpoint's prompt store lives: the cache its text features came from (None if gone)."""
    folder = Path(meta.get("text_cache") or meta["cache"])
    return folder if folder.is_dir() else None
