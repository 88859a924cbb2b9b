"""Captions for image files: a trained captioner with its frozen image encoders, loaded once."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmcache.caption.config import CaptionDecoding
from vlmcache.caption.decode import generate
from vlmcache.caption.model import load_captioner
from vlmcache.errors import VlmcacheError


class CaptionPredictor:
    """A captioner with its frozen image encoder, loaded once: captions for image files."""

    def __init__(self, checkpoint: str | Path):
        from vlmcache.encode import encoders

        self.model, self.meta = load_captioner(checkpoint)
        self.encoders = [encoders.image_encoder_from_provenance(provenance, "cpu")
                         for provenance in self.meta.get("image_encoders") or [self.meta["image_encoder"]]]

    def caption(self, images: list[str | Path], beam: int = 5) -> list[str]:
        """One caption per image file (the image encoder runs on each, as `extract` would)."""
        from vlmcache.data.datasets import ImageDecodeError, load_rgb

        CaptionDecoding(beam)  # refuses a beam out of range before any image is read
        tokens = self.model.config.projector == "resampler"
        inputs = []
        for image in images:
            if not Path(image).is_file():
                raise VlmcacheError(f"{image}: image file not found")
            try:
                picture = load_rgb(image)
            except ImageDecodeError as error:
                raise VlmcacheError(f"{image}: {error}") from None
            encoded = [encoder.encode(torch.from_numpy(encoder.preprocess(picture))[None], tokens)
                       for encoder in self.encoders]  # every feature set's encoder, concatenated as in the cache
            inputs.append(encoded[0].tokens if tokens else torch.cat([output.pooled for output in encoded], dim=1))
        return generate(self.model, torch.cat(inputs), beam)


def caption_images(checkpoint: str | Path, images: list[str | Path], beam: int = 5) -> list[str]:
    """Captions for image files with a trained captioner (see CaptionPredictor)."""
    CaptionDecoding(beam)  # before the captioner and its image encoder are loaded
    return CaptionPredictor(checkpoint).caption(images, beam)
