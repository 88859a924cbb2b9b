"""How to extract: one typed definition per option of `vlmcache extract` (vlmcache.options), importable without
torch so the command line can build its options from it."""

from __future__ import annotations

from dataclasses import dataclass

from vlmcache.cache.layout import set_name
from vlmcache.data.datasets import FORMATS, ON_ERROR
from vlmcache.errors import VlmcacheError
from vlmcache.options import check_options, option

DEFAULT_IMAGE_MODEL = "efficientnet-lite0"
DEFAULT_TEXT_MODEL = "minilm"
IMAGE_POOLINGS = ("cls", "mean", "pooler", "avgpool")
TEXT_POOLINGS = ("mean", "cls", "pooler")
BACKENDS = ("auto", "onnxruntime", "torch", "eager")
DTYPES = ("float16", "float32")
MAX_WORKERS = 64
DECODES = ("auto", "draft", "full")


def parse_layers(value) -> tuple[str, ...]:
    """Layers from '-2,-4' / 'block5,l4' (command line, TOML) or a sequence (Python, a manifest)."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(str(item).strip() for item in items if str(item).strip())


@dataclass
class ExtractConfig:
    """How to extract: encoders, dataset reading, storage and compute options (recorded in the manifest)."""

    # The encoders are given on the command line as repeated --image-model/--text-model (first: the default set).
    image_model: str = option(DEFAULT_IMAGE_MODEL, "The default image encoder.", cli=False)
    text_model: str = option(DEFAULT_TEXT_MODEL, "The default text encoder.", cli=False)
    # Further encoders: each becomes a feature set of its own in the same cache (see vlmcache.cache.store).
    extra_image_models: tuple[str, ...] = option((), "Further image encoders, one feature set each.", cli=False)
    extra_text_models: tuple[str, ...] = option((), "Further text encoders, one feature set each.", cli=False)
    # Further layers of every image / text encoder (-2, block5, l4, ...): each a feature set NAME:LAYER of its own.
    image_layers: tuple[str, ...] = option((), "As --layers, for the image encoders only (overrides --layers for them).",
                                           cli_type=str, parse=parse_layers)
    text_layers: tuple[str, ...] = option((), "As --layers, for the text encoders only (overrides --layers for them).",
                                          cli_type=str, parse=parse_layers)
    image_pooling: str | None = option(None, "cls | mean | pooler | avgpool [default: cls for ViT-like, avgpool for CNNs]",
                                       choices=IMAGE_POOLINGS)
    text_pooling: str | None = option(None, "mean | cls | pooler [default: mean over the attention mask]",
                                      choices=TEXT_POOLINGS)
    format: str = option("auto", "auto | flickr8k | karpathy | pairs | imagefolder | webdataset | hf (Hugging Face: a "
                         "save_to_disk folder or Hub parquet files)", choices=FORMATS)
    images_dir: str | None = option(None, "Where images are, if not beside the dataset file. hf: read each row's stored "
                                    "image path inside this folder (never outside it) instead of its stored bytes.")
    splits: list[str] | None = option(None, "Comma-separated splits to keep, e.g. train,val [default: all]",
                                      cli_type=str)
    limit: int | None = option(None, "Keep the first N images of each split (quick runs).", low=1, high=1 << 40)
    shard_size: int = option(1024, "Rows per HDF5 shard (the unit of resume).", low=1, high=1 << 22)
    dtype: str = option("float16", "float16 | float32 storage.", choices=DTYPES)
    batch_size: int = option(64, "Images per forward pass.", low=1, high=1 << 16)
    text_batch_size: int = option(256, "Captions per forward pass.", low=1, high=1 << 16)
    max_length: int = option(64, "Caption tokens kept (longer ones are truncated and counted).", low=1, high=8192)
    workers: int | None = option(None, "Image-decoding worker processes [default: 1 on CPU, up to 8 on GPU]", low=0,
                                 high=MAX_WORKERS)
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    tokens: bool = option(False, "Also store token-level states with their mask.", flag="--tokens")
    on_error: str = option("fail", "fail: stop at the first bad image/caption, naming it; skip: record it in the "
                           "manifest and go on.", choices=ON_ERROR)
    backend: str = option("auto", "Image encoder backend: auto (onnxruntime on a CPU when installed, else torch) | "
                          "onnxruntime | torch (CNNs: BatchNorm folded, channels_last) | eager. All give the same "
                          "features within float rounding.", choices=BACKENDS)
    caption_key: str | None = option(None, "webdataset: take captions from this field of each sample's .json "
                                     "[default: the .txt member, else the json's 'caption']")
    split_key: str = option("split", "webdataset: the .json field naming a sample's split (train/val/test); hf: the "
                            "column naming a row's split, when the files have it.")
    val_fraction: float | None = option(None, "webdataset: put this fraction of samples (fixed seed 0) in val, the "
                                        "rest in train, instead of --split-key.", low=0.0, high=1.0, open_low=True)
    image_column: str | None = option(None, "hf: the image column [default: the Image feature, else a struct with bytes, "
                                      "else a column named image/img/...]")
    caption_column: str | None = option(None, "hf: the caption column, a string or a list of strings per row [default: "
                                        "the first of caption, captions, text, sentences, raw]")
    decode: str = option("auto", "JPEG decoding. draft: at a reduced DCT scale (1/2, 1/4, 1/8) that keeps both sides ≥ "
                         "1.5× what the encoder's resize needs, by simplejpeg (libjpeg-turbo, the fast extra) when "
                         "installed, else by Pillow, the same pixels either way: 2.0-2.5× faster per decode worker on "
                         "1024-1600 px photos, features at mean cosine ≥ 0.9993 to full (docs/speed.md); full: every "
                         "pixel; auto: draft on a GPU, where decoding bounds the pass, full on a CPU, where the encoder "
                         "does. Recorded in the provenance with the decoder: a cache resumes only with the same choice.",
                         choices=DECODES)

    def __post_init__(self):
        if self.images_dir is not None:
            self.images_dir = str(self.images_dir)
        if isinstance(self.splits, str):  # the command line's comma-separated list
            self.splits = [name.strip() for name in self.splits.split(",") if name.strip()] or None
        self.extra_image_models, self.extra_text_models = tuple(self.extra_image_models), tuple(self.extra_text_models)
        check_options(self)  # types, ranges and choices of every field, from its option() definition
        for modality, models in (("image", (self.image_model, *self.extra_image_models)),
                                 ("text", (self.text_model, *self.extra_text_models))):
            names = [set_name(model) for model in models]
            if len(set(names)) != len(names):
                raise VlmcacheError(f"--{modality}-model: {', '.join(models)} name the same feature set twice; "
                                    "give each encoder once")
        if self.tokens and self.backend == "onnxruntime":
            raise VlmcacheError("--tokens needs --backend torch or eager (the ONNX export gives pooled features only)")


