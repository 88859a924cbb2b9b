"""Extraction throughput, all in one run on one machine.

Reports: JPEG decode + preprocess images/s (one process), the image encoder's forward pass on
pre-decoded tensors (plain eager NCHW, the torch fast path, ONNX Runtime), full `vlmcache extract`
images/s, its ratio to forward-only, and captions/s for the text encoder: eager in file order (the
baseline), eager length-sorted, ONNX Runtime length-sorted, and the full extract's caption pass.

    python benchmarks/extract_throughput.py                       # offline default encoders, CPU
    python benchmarks/extract_throughput.py --model resnet18-config --device cuda
    python benchmarks/extract_throughput.py --model vit-b16-config --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from vlmcache import extract
from vlmcache.data.datasets import load_rgb
from vlmcache.encode.encoders import load_image_encoder, load_text_encoder

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def config_built_model(name: str, folder: Path) -> str:
    """ViT-B/16- or ResNet18-sized HF models built from configs (random weights: speed only)."""
    from transformers import ResNetConfig, ResNetModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    if name == "vit-b16-config":
        model = ViTModel(ViTConfig(image_size=224, patch_size=16))
        preprocess = {"size": {"height": 224, "width": 224}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    else:
        model = ResNetModel(ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]))
        preprocess = {"size": {"shortest_edge": 224}, "crop_pct": 0.875}
    model.save_pretrained(folder / name)
    (folder / name / "preprocessor_config.json").write_text(json.dumps(preprocess))
    return str(folder / name)


def timed(function, repeats: int) -> float:
    """Best-of-N wall seconds of function() (after one warm-up call)."""
    function()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def slice_dataset(folder: Path, images: int) -> tuple[Path, list[str]]:
    """A Flickr8k-layout folder with the first `images` dev images (symlinked) and their captions."""
    names = (FLICKR / "Flickr_8k.devImages.txt").read_text().split()[:images]
    (folder / "Images").mkdir(parents=True)
    for name in names:
        (folder / "Images" / name).symlink_to(FLICKR / "Images" / name)
    wanted = set(names)
    lines = [line for line in (FLICKR / "Flickr8k.token.txt").read_text().splitlines() if line.split("#")[0] in wanted]
    (folder / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (folder / "Flickr_8k.devImages.txt").write_text("\n".join(names) + "\n")
    return folder, [line.split("\t", 1)[1] for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet-lite0",
                        help="efficientnet-lite0, vit-b16-config, resnet18-config, or an HF model folder")
    parser.add_argument("--images", type=int, default=512, help="images to extract (from Flickr8k dev)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    if not FLICKR.is_dir():
        raise SystemExit(f"needs the shared Flickr8k data at {FLICKR}")

    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
               "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "model": args.model, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = args.model if args.model in ("efficientnet-lite0",) or Path(args.model).is_dir() \
            else config_built_model(args.model, scratch)
        data, captions = slice_dataset(scratch / "data", args.images)
        eager = load_image_encoder(model, device=args.device, backend="eager")
        paths = sorted((data / "Images").iterdir())[:args.batch_size * 2]
        decode = timed(lambda: [eager.preprocess(load_rgb(p)) for p in paths], 2)
        results["decode_images_per_s"] = len(paths) / decode
        pixels = torch.stack([torch.from_numpy(eager.preprocess(load_rgb(p))) for p in paths[:args.batch_size]])
        reference = eager.encode(pixels).pooled
        results["forward_eager_images_per_s"] = args.batch_size / timed(lambda: eager.encode(pixels), 3)
        backends = ["torch"] + (["onnxruntime"] if args.device == "cpu" else [])
        for backend in backends:
            encoder = load_image_encoder(model, device=args.device, backend=backend)
            results[f"forward_{backend}_images_per_s"] = args.batch_size / timed(lambda e=encoder: e.encode(pixels), 3)
            results[f"{backend}_path"] = encoder.compute_path
            results[f"{backend}_max_abs_diff_vs_eager"] = float((encoder.encode(pixels).pooled - reference).abs().max())
        default = load_image_encoder(model, device=args.device)  # what extract uses ("auto")
        fastest = next(b for b in backends if results[f"{b}_path"] == default.compute_path)

        run = extract(data, scratch / "cache", image_model=model, batch_size=args.batch_size, device=args.device,
                      workers=args.workers, progress=False)
        results["extract_images_per_s"] = run.images / run.image_seconds
        results["extract_backend"] = fastest
        results["extract_over_its_forward_only"] = results["extract_images_per_s"] / results[f"forward_{fastest}_images_per_s"]
        results["extract_over_eager_forward"] = results["extract_images_per_s"] / results["forward_eager_images_per_s"]

        sample = captions[:1024]
        for backend in ["eager"] + (["onnxruntime"] if args.device == "cpu" else []):
            text = load_text_encoder("minilm", device=args.device, backend=backend)

            def encode_in_batches(order, encoder=text):
                for start in range(0, len(order), 256):
                    encoder.encode([sample[i] for i in order[start:start + 256]])

            by_length = np.argsort(text.token_lengths(sample), kind="stable")
            if backend == "eager":  # the baseline: batches in file order
                results["captions_per_s_eager_file_order"] = len(sample) / timed(
                    lambda: encode_in_batches(np.arange(len(sample))), 2)
            results[f"captions_per_s_{backend}_length_sorted"] = len(sample) / timed(
                lambda order=by_length: encode_in_batches(order), 2)
        results["extract_captions_per_s"] = run.captions / run.text_seconds

    table = Table(title=f"extraction throughput: {args.model}, batch {args.batch_size}, {results['device']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in results.items():
        text = str(value) if not isinstance(value, float) else f"{value:.1e}" if 0 < abs(value) < 0.01 else f"{value:,.2f}"
        table.add_row(key, text)
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
