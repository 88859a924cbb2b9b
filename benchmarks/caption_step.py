"""CPU cost of one captioner training step per projector: pooled-feature MLP vs the resampler over token states.

    OMP_NUM_THREADS=1 python benchmarks/caption_step.py

The default captioner (3 layers × 256, 4 prefix tokens) on random inputs shaped like Flickr8k's: 128 captions
of 14 tokens, a 2,600-word vocabulary, EfficientNet-Lite0's 1280-d pooled vector or its 49 × 1280 tokens.
Forward + backward + AdamW step; CPU seconds per step (process time), after 2 warm-up steps.
"""

from __future__ import annotations

import argparse
import time

import torch

from vlmcache.caption.config import CaptionConfig
from vlmcache.caption.model import Captioner


def step_seconds(projector: str, steps: int, batch: int, words: int, width: int, tokens: int) -> float:
    """Mean CPU seconds of one training step of the default captioner with `projector`."""
    torch.manual_seed(0)
    model = Captioner(CaptionConfig(projector=projector), width, [f"w{i}" for i in range(2600)], token_count=tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(batch, tokens, width) if projector == "resampler" else torch.randn(batch, width)
    ids, lengths = torch.randint(4, 2600, (batch, words)), torch.full((batch,), words)
    for step in range(steps + 2):
        if step == 2:
            started = time.process_time()
        loss = model.loss(images, ids, lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.process_time() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    measured = {projector: step_seconds(projector, args.steps, 128, 14, 1280, 49) for projector in ("mlp", "resampler")}
    for projector, seconds in measured.items():
        print(f"{projector}: {seconds * 1000:,.0f} ms CPU per step ({torch.get_num_threads()} threads)")
    print(f"resampler / mlp: {measured['resampler'] / measured['mlp']:.2f}x")


if __name__ == "__main__":
    main()
