"""`vlmcache export-model`: a trained dual encoder as two ONNX graphs that embed with onnxruntime and tokenizers
alone (no PyTorch, transformers or vlmcache where they run; docs/export.md has a ten-line classifier).

- image.onnx: uint8 RGB pixels (N, H, W, 3), already resized and centre-cropped as image.json says, -> unit
  embeddings (N, dim). The graph holds the rest: scaling to [0, 1], the encoder's mean/std, the frozen image
  encoder, its pooling (or token states, for a token projector) and the image projector. A run trained on several
  image feature sets takes one input per set, each with its own preprocessing, concatenated as in training.
- text.onnx: token ids and attention mask (N, L) int64 per text encoder -> unit embeddings (N, dim); each
  encoder's tokenizer is saved as a `tokenizers` file with its truncation and padding on (tokenizer.json, or
  tokenizer-<i>.json for several), so `encode_batch` gives the graph's inputs directly.

The graphs are traced from the very modules vlmcache runs (plain PyTorch, eager), so their embeddings equal
`Predictor`'s within float rounding (tested to 1e-4).
"""

from __future__ import annotations

import io
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlmcache.align.config import TrainConfig
from vlmcache.align.inputs import refuse_text_tokens
from vlmcache.align.load import build_checked
from vlmcache.align.model import AlignmentModel
from vlmcache.cache.tokens import Tokens
from vlmcache.encode import encoders
from vlmcache.errors import VlmcacheError
from vlmcache.files import atomic_write, write_json_atomic
from vlmcache.run.checkpoint import read_checkpoint

FORMATS = ("onnx",)
OPSET = 17
FIXED_FILES = ("image.onnx", "image.json", "text.onnx", "text.json")


@dataclass
class ExportResult:
    """An exported run: where its files are, the encoders of each graph and the embedding size."""

    out: Path
    files: list[str]
    image_encoders: list[str]
    text_encoders: list[str]
    dim: int
    seconds: float


class ImageGraph(nn.Module):
    """Resized, cropped uint8 RGB pixels of each image encoder -> the run's unit image embeddings."""

    def __init__(self, image_encoders: list[encoders.ImageEncoder], model: AlignmentModel, tokens: bool):
        super().__init__()
        self.encoders, self.model, self.tokens = image_encoders, model, tokens
        self.models = nn.ModuleList(encoder.model for encoder in image_encoders)  # traced weights
        for index, encoder in enumerate(image_encoders):
            self.register_buffer(f"mean{index}", torch.tensor(encoder.preprocess.mean, dtype=torch.float32))
            self.register_buffer(f"std{index}", torch.tensor(encoder.preprocess.std, dtype=torch.float32))

    def forward(self, *pictures: torch.Tensor) -> torch.Tensor:
        features = []
        for index, (encoder, picture) in enumerate(zip(self.encoders, pictures, strict=True)):
            # As Preprocess: float32 / 255, then (x - mean) / std, then channels first.
            pixels = (picture.float() / 255.0 - getattr(self, f"mean{index}")) / getattr(self, f"std{index}")
            pooled, states = encoder.forward(pixels.permute(0, 3, 1, 2))
            features.append(states if self.tokens else pooled)
        if self.tokens:  # token projectors read one set (TrainConfig refuses several); every image token is real
            states = features[0]
            return self.model.embed_images(Tokens(states, torch.ones(states.shape[:2], dtype=torch.bool)))
        return self.model.embed_images(torch.cat(features, dim=1))


class TextGraph(nn.Module):
    """(token ids, attention mask) of each text encoder -> the run's unit text embeddings."""

    def __init__(self, text_encoders: list[encoders.TextEncoder], model: AlignmentModel):
        super().__init__()
        self.encoders, self.model = text_encoders, model
        self.models = nn.ModuleList(encoder.model for encoder in text_encoders)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        pooled = [encoder.forward(inputs[2 * index], inputs[2 * index + 1])[0]
                  for index, encoder in enumerate(self.encoders)]
        return self.model.embed_texts(torch.cat(pooled, dim=1))


def export_model(run: str | Path, out: str | Path, format: str = "onnx") -> ExportResult:
    """Write a trained run's image and text sides to `out` as ONNX graphs with their preprocessing (image.json) and
    tokenizers (text.json, tokenizer*.json); returns what was written. `out` must be new, empty or an earlier
    export (whose files are replaced)."""
    started = time.perf_counter()
    if format not in FORMATS:
        raise VlmcacheError(f"--format {format}: use one of {', '.join(FORMATS)}")
    model, meta = _load_run(run)
    config = TrainConfig.from_dict(meta["config"])
    refuse_text_tokens(config, "export-model")
    image_records = meta.get("image_encoders") or [meta["image_encoder"]]
    text_records = meta.get("text_encoders") or [meta["text_encoder"]]
    for modality, record in [*(("image", r) for r in image_records), *(("text", r) for r in text_records)]:
        _check_exportable(run, modality, record)
    out = _prepare_out(Path(out))
    image_encoders = [encoders.image_encoder_from_provenance(record, "cpu", backend="eager") for record in image_records]
    text_encoders = [encoders.text_encoder_from_provenance(record, "cpu", backend="eager") for record in text_records]
    tokenizers = _tokenizer_files(text_encoders)
    image_inputs = _image_inputs(image_encoders)
    text_inputs = _text_inputs(text_encoders, list(tokenizers))
    _write_graph(out / "image.onnx", ImageGraph(image_encoders, model, config.tokens), _image_examples(image_encoders),
                 [entry["name"] for entry in image_inputs], {entry["name"]: {0: "batch"} for entry in image_inputs})
    text_names = [name for entry in text_inputs for name in (entry["ids"], entry["mask"])]
    _write_graph(out / "text.onnx", TextGraph(text_encoders, model),
                 tuple(torch.ones(2, 8, dtype=torch.long) for _ in text_names), text_names,
                 {name: {0: "batch", 1: "sequence"} for name in text_names})
    for name, text in tokenizers.items():
        with atomic_write(out / name) as temporary:
            temporary.write_text(text, encoding="utf-8")
    common = {"format": "vlmcache-onnx", "version": 1, "output": "embedding", "dim": config.dim,
              "logit_scale": model.loss.scale(), "run": str(Path(run).resolve())}
    write_json_atomic(out / "image.json", {**common, "inputs": image_inputs})
    write_json_atomic(out / "text.json", {**common, "inputs": text_inputs})
    return ExportResult(out, [*FIXED_FILES, *tokenizers], [e.name for e in image_encoders],
                        [e.name for e in text_encoders], config.dim, time.perf_counter() - started)


def _load_run(run: str | Path) -> tuple[AlignmentModel, dict]:
    """The run's model and metadata; a captioning run is refused (it has no text side to export)."""
    tensors, header = read_checkpoint(run)
    if header["vlmcache"].get("kind") == "captioner":
        raise VlmcacheError(f"{run}: a captioning run; export-model exports the dual encoders of vlmcache train runs")
    return build_checked(header["vlmcache"], tensors, header["path"]).eval(), header["vlmcache"]


def _check_exportable(run: str | Path, modality: str, record: dict) -> None:
    """Refuse a side whose features vlmcache cannot recompute: imported or synthetic features record no encoder."""
    runnable = record.get("kind") in ("efficientnet", "transformers") if modality == "image" else (
        record.get("kind") == "transformers" and record.get("max_length") is not None)
    if not runnable:
        raise VlmcacheError(f"{run}: its {modality} features come from {record.get('name')!r}, which records no encoder "
                            "vlmcache can run (imported or synthetic features); export-model needs a run trained on "
                            "features of vlmcache extract")


def _prepare_out(out: Path) -> Path:
    """`out` created, or refused when it is a file, cannot be written, or holds files an export does not write
    (an earlier export's files are replaced: any tokenizer file left from it is removed now)."""
    if out.exists() and not out.is_dir():
        raise VlmcacheError(f"--out {out}: is a file; give a folder for the exported model")
    others = sorted(path.name for path in out.iterdir() if not _export_file(path.name)) if out.is_dir() else []
    if others:
        raise VlmcacheError(f"--out {out}: holds other files ({', '.join(others[:3])}); give a new or empty folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise VlmcacheError(f"--out {out}: cannot create it ({error.strerror}); give a writable folder") from None
    if not os.access(out, os.W_OK):
        raise VlmcacheError(f"--out {out}: not writable; give a writable folder")
    for stale in out.glob("tokenizer*.json"):
        stale.unlink()
    return out


def _export_file(name: str) -> bool:
    return name in FIXED_FILES or (name.startswith("tokenizer") and name.endswith(".json"))


def _suffix(index: int, count: int) -> str:
    """'' for a side with one encoder (the plain names), '_<index>' for each of several."""
    return "" if count == 1 else f"_{index}"


def _image_inputs(image_encoders: list[encoders.ImageEncoder]) -> list[dict]:
    """image.json's inputs: each graph input's name and how to make its pixels from a photo."""
    entries = []
    for index, encoder in enumerate(image_encoders):
        preprocess = encoder.preprocess
        squash = preprocess.resize_mode == "squash"
        entries.append({"name": "pixels" + _suffix(index, len(image_encoders)), "encoder": encoder.name,
                        "layout": "uint8 RGB (N, H, W, 3)", "size": preprocess.size,
                        # The shorter side is resized to this, then the centre size×size is cropped (None: the
                        # whole image is resized to size×size).
                        "shorter_side": None if squash else round(preprocess.size / preprocess.crop_pct),
                        "resample": preprocess.resample, "mean": list(preprocess.mean), "std": list(preprocess.std)})
    return entries


def _text_inputs(text_encoders: list[encoders.TextEncoder], tokenizer_files: list[str]) -> list[dict]:
    """text.json's inputs: each encoder's ids and mask input names and its tokenizer file."""
    return [{"ids": "input_ids" + _suffix(index, len(text_encoders)),
             "mask": "attention_mask" + _suffix(index, len(text_encoders)), "tokenizer": tokenizer_file,
             "encoder": encoder.name, "max_length": encoder.max_length}
            for index, (encoder, tokenizer_file) in enumerate(zip(text_encoders, tokenizer_files, strict=True))]


def _tokenizer_files(text_encoders: list[encoders.TextEncoder]) -> dict[str, str]:
    """{file name: `tokenizers` JSON} of each text encoder, with truncation to its max length and padding to the
    longest text on, as vlmcache tokenizes."""
    from tokenizers import Tokenizer

    files = {}
    for index, encoder in enumerate(text_encoders):
        hf = encoder.tokenizer
        if not getattr(hf, "is_fast", False):
            raise VlmcacheError(f"text model {encoder.name}: its tokenizer has no `tokenizers` form (not a fast "
                                "tokenizer), so the exported model could not tokenize without transformers")
        tokenizer = Tokenizer.from_str(hf.backend_tokenizer.to_str())
        tokenizer.enable_truncation(encoder.max_length)
        tokenizer.enable_padding(pad_id=hf.pad_token_id, pad_token=hf.pad_token)
        files[f"tokenizer{'' if len(text_encoders) == 1 else f'-{index}'}.json"] = tokenizer.to_str()
    return files


def _image_examples(image_encoders: list[encoders.ImageEncoder]) -> tuple[torch.Tensor, ...]:
    sizes = [encoder.preprocess.size for encoder in image_encoders]
    return tuple(torch.zeros(2, size, size, 3, dtype=torch.uint8) for size in sizes)


def _write_graph(path: Path, module: nn.Module, examples: tuple[torch.Tensor, ...], names: list[str],
                 dynamic_axes: dict[str, dict[int, str]]) -> None:
    """Trace `module` on `examples` to an ONNX file (written whole or not at all)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():  # the TorchScript-based exporter announces its deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), examples, buffer, input_names=names, output_names=["embedding"],
                          dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False)
    with atomic_write(path) as temporary:
        temporary.write_bytes(buffer.getvalue())
