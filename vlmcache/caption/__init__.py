"""Captioning on cached image features: a projector turns an image into K prefix vectors, a language
model continues them into a caption (ClipCap, Mokady et al. 2021; LLaVA stage 1).

Two decoders:
- `small`: a compact GPT-style transformer trained from scratch on the cache's training captions, with a
  word vocabulary built from those captions (words seen at least `min_count` times). Words, not the
  MiniLM WordPiece vocabulary, because the output softmax is the dominant cost on a CPU: ~2.5k words
  instead of 30k word pieces, and sequences are shorter; the metrics are computed on words anyway.
- any Hugging Face causal LM (`AutoModelForCausalLM`, a hub name or a local folder): the projected prefix
  goes in as `inputs_embeds`; frozen by default (only the projector trains), `tune_lm` trains it too.

Projectors: `linear` and `mlp` map the pooled feature to K·width numbers; `resampler` (a Perceiver
resampler over the cache's token states, `extract --tokens`) reads the image's tokens into K latents.

Modules, each importing only those above it: config (CaptionConfig), vocab (the small decoder's words),
model (decoders, Captioner, loading one), decode (greedy, beam search), data (a split, its batches),
train (train_captioner), evaluate (beside the baselines), predict (captions for image files).

The names below are imported on first use, so importing one module does not load them all.
"""

from importlib import import_module

_EXPORTS = {"CaptionConfig": "config", "Captioner": "model", "load_captioner": "model", "generate": "decode",
            "train_captioner": "train", "CaptionResult": "train", "evaluate_captioner": "evaluate",
            "CaptionReport": "evaluate", "CaptionPredictor": "predict", "caption_images": "predict"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"vlmcache.caption.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'vlmcache.caption' has no attribute {name!r}")
