"""The text encoder a cache keeps for queries: its ONNX export, its tokenizer, and the record that vouches for them.

`extract` writes `text-encoder.onnx` and `text-tokenizer.json`, then `text-encoder.json` — last, so its presence
says the other two are whole — with the settings they were exported with and the SHA-256 of each. Every reader
(vlmcache.encode.prompts) and `vlmcache verify` check the two files against it, so a file cut short or altered is
refused in one line rather than loaded. A record without hashes (written by an older vlmcache) vouches for
nothing: the saved encoder is then not used (prompts are encoded by the model itself) and the next `extract` of
the cache writes it again. Importable without torch or h5py: the one-off search path reads it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from vlmcache.errors import VlmcacheError
from vlmcache.files import (
    file_sha256,
    read_json_file,
    read_verified_bytes,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

MODEL, TOKENIZER, RECORD = "text-encoder.onnx", "text-tokenizer.json", "text-encoder.json"
HINT = f"delete {RECORD} and run the same vlmcache extract again to rebuild it"
SHAPE = {"weights_sha256": str, "max_length": int, "pooling": str, "pad_id": int, "pad_token": str,
         "sha256?": {MODEL: str, TOKENIZER: str}}


def read_record(folder: Path) -> dict | None:
    """The cache's text-encoder.json, checked (None when the cache has no saved text encoder)."""
    if not (folder / RECORD).is_file():
        return None
    return read_json_file(folder / RECORD, "saved text encoder record", HINT, shape=SHAPE)


def is_vouched_for(record: dict | None) -> bool:
    """Whether a record carries the SHA-256 of the saved files (one written before it did vouches for nothing)."""
    return record is not None and "sha256" in record


def read_files(folder: Path, record: dict) -> tuple[bytes, str]:
    """(ONNX model bytes, tokenizer JSON text) of a vouched-for saved encoder, each checked against its SHA-256."""
    model = read_verified_bytes(folder / MODEL, record["sha256"][MODEL], "saved ONNX text encoder", HINT)
    tokenizer = read_verified_bytes(folder / TOKENIZER, record["sha256"][TOKENIZER], "saved tokenizer", HINT)
    try:
        return model, tokenizer.decode("utf-8")
    except UnicodeDecodeError:  # the hash matched, so the file was written so: refuse it all the same
        raise VlmcacheError(f"{folder / TOKENIZER}: not UTF-8 text; {HINT}") from None


def write(folder: Path, model: bytes, tokenizer: str, settings: dict) -> None:
    """Save the encoder's files, then the record of their settings and SHA-256 (see the module docstring)."""
    write_bytes_atomic(folder / MODEL, model)  # sized: a full disk says how much the export needs
    write_text_atomic(folder / TOKENIZER, tokenizer)
    hashes = {MODEL: hashlib.sha256(model).hexdigest(), TOKENIZER: hashlib.sha256(tokenizer.encode("utf-8")).hexdigest()}
    write_json_atomic(folder / RECORD, {**settings, "sha256": hashes})


def needs_writing(folder: Path) -> bool:
    """Whether extract should (re)write the saved encoder: none yet, an unreadable record, one that vouches for
    nothing, or a file of it deleted. One whose files differ from their hashes is left for `verify` to report
    (and the user to delete): extract never replaces a file it has not been told is bad."""
    try:
        record = read_record(folder)
    except VlmcacheError:
        return True
    return not is_vouched_for(record) or not all((folder / name).is_file() for name in (MODEL, TOKENIZER))


def problems(folder: Path) -> list[tuple[str, str]]:
    """(file, problem) for each saved-encoder file that is missing or differs from its recorded SHA-256."""
    try:
        record = read_record(folder)
    except VlmcacheError as error:
        return [(str(folder / RECORD), str(error).split(": ", 1)[-1])]
    if not is_vouched_for(record):
        return []
    found = []
    for name in (MODEL, TOKENIZER):
        if not (folder / name).is_file():
            found.append((str(folder / name), f"missing; {HINT}"))
        elif file_sha256(folder / name) != record["sha256"][name]:
            found.append((str(folder / name), f"differs from the SHA-256 recorded when it was written; {HINT}"))
    return found
