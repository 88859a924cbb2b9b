"""The `vlmcache` command line: parses arguments, calls the library, prints rich tables. No logic here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vlmcache.align.config import TrainConfig
from vlmcache.app.tables import (
    ablation_table,
    caption_table,
    probe_table,
    ranking_table,
    report_table,
)
from vlmcache.caption.config import CaptionConfig
from vlmcache.encode.config import ExtractConfig
from vlmcache.errors import VlmcacheError
from vlmcache.files import DiskFullError, is_disk_full
from vlmcache.options import with_options

app = typer.Typer(
    help="Run frozen vision/text encoders once, cache their features, then train and compare CLIP-style "
         "projectors on the cache in minutes on a CPU.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")


console = Console()


if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = 160  # piped into a file or CI log: keep whole tables rather than 80 truncated columns


def _split_list(value) -> list[str] | None:
    if isinstance(value, list | tuple):  # from a TOML config file
        return [str(item) for item in value]
    return [item.strip() for item in value.split(",") if item.strip()] if value else None


@app.command(epilog="Examples:\n\n  vlmcache extract ../shared/data/flickr8k --out features/flickr8k\n\n"
                    "  vlmcache extract ../shared/data/flickr8k --out features/flickr8k-multi --image-model efficientnet-lite0 "
                    "--image-model efficientnet-lite2\n\n"
                    "  vlmcache extract data/pairs.csv --image-model google/vit-base-patch16-224-in21k "
                    "--text-model distilbert-base-uncased --out features/vit-distilbert\n\n"
                    "  vlmcache extract ../shared/data/flickr8k --out features/flickr8k-multi --layers -2,-3   "
                    "(two more layers of each encoder)\n\n"
                    "  torchrun --nproc_per_node=4 -m vlmcache extract data/dataset_coco.json --out features/coco\n\n"
                    "  vlmcache extract 'shards/{00000..00099}.tar' --val-fraction 0.05 --out features/laion-subset")
@with_options(ExtractConfig)
def extract(
    options: dict,
    data: Annotated[Path, typer.Argument(help="Flickr8k folder, Karpathy dataset_*.json, CSV/JSONL of "
                                              "image,caption[,split], a labelled image folder root/<class>/*.jpg, or webdataset "
                                              "tar shards (a folder of .tar, a glob, or shards/{00000..00099}.tar).")],
    out: Annotated[Path, typer.Option(help="Cache folder to write.")] = Path("features/cache"),
    image_model: Annotated[list[str] | None, typer.Option(help="'efficientnet-lite0' / '-lite1' / '-lite2' (offline), or any HF image model name or folder. Repeat for several feature sets in one cache (the first is the default set) [default: efficientnet-lite0]")] = None,
    text_model: Annotated[list[str] | None, typer.Option(help="'minilm' (offline), or any HF text model name or folder. Repeat for several feature sets [default: minilm]")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing cache instead of resuming it.")] = False,
    layers: Annotated[str | None, typer.Option(help="Also store these layers of every encoder, each as its own feature set NAME:LAYER beside the final output: comma-separated negative indices (-1 = the final output, -2 the layer before) or names (efficientnet-lite0: block1..block16, head; HF models: l0..lN). A cache that has the rest computes only the new layers.")] = None,
) -> None:
    """Encode a dataset once with frozen encoders and write a sharded HDF5 feature cache (resumable)."""
    from vlmcache.encode.extract import extract as run_extract

    image_models, text_models = image_model or ["efficientnet-lite0"], text_model or ["minilm"]
    config = ExtractConfig(image_model=image_models[0], text_model=text_models[0], extra_image_models=tuple(image_models[1:]),
                           extra_text_models=tuple(text_models[1:]),
                           **{**options, **{f"{side}_layers": options[f"{side}_layers"] or layers or () for side in ("image", "text")}})
    result = run_extract(data, out, config, overwrite=overwrite)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    console.print(f"[green]cache ready[/green] {result.path}: {result.images:,} images, {result.captions:,} captions "
                  f"({result.shards_written} shards written, {result.shards_reused} reused) in {result.seconds:.1f} s")
    if result.shards_tokens_added:
        console.print(f"token states added to {result.shards_tokens_added} existing shards (their pooled features kept)")
    if result.skipped:
        console.print(f"[yellow]skipped {len(result.skipped)} items[/yellow] (reasons in {result.path}/manifest.json)")
    if result.truncated_captions:
        console.print(f"{result.truncated_captions} captions were longer than --max-length and truncated")


@app.command(epilog="Example:\n\n  vlmcache info features/flickr8k")
def info(cache: Annotated[Path, typer.Argument(help="Cache folder.")]) -> None:
    """Show a cache's provenance: dataset, splits, encoders, preprocessing, libraries, skipped items."""
    from vlmcache.cache.store import open_cache

    opened = open_cache(cache)
    manifest = opened.manifest
    table = Table(title=f"vlmcache cache {cache}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    dataset = manifest["dataset"]
    table.add_row("dataset", f"{dataset['format']} at {dataset['root']}")
    table.add_row("fingerprint", dataset["fingerprint"])
    table.add_row("splits", ", ".join(f"{name}: {c['images']:,} images / {c['captions']:,} captions"
                                      for name, c in dataset["splits"].items()))
    for modality in ("images", "texts"):
        sets = opened.feature_sets(modality)
        table.add_row(f"{modality} feature sets", ", ".join(f"{name} ({s.dim}-d, {s.folder}/)" for name, s in sets.items())
                      + ("  [first = default]" if len(sets) > 1 else ""))
        for name, feature_set in sets.items():
            prov, what = feature_set.provenance, f"{modality} {name}" if len(sets) > 1 else modality
            encoder = prov["encoder"]
            table.add_row(f"{what} encoder", f"{encoder['name']}  pooling={encoder['pooling']}  dim={encoder['dim']}  "
                                             f"precision={encoder.get('precision')}")
            table.add_row(f"{what} weights sha256", encoder["weights_sha256"])
            extra = encoder.get("preprocess") or {"max_length": encoder.get("max_length"), "tokenizer": encoder.get("tokenizer")}
            table.add_row(f"{what} preprocessing", json.dumps(extra))
            table.add_row(f"{what} storage", f"{prov['dtype']}, {len(feature_set.shards)} shards of "
                                             f"{prov.get('shard_size')} rows, tokens={prov.get('tokens', False)}")
            table.add_row(f"{what} compute path", prov.get("compute_path", "eager")
                          + (f" (tokens: {prov['token_compute_path']})" if "token_compute_path" in prov else ""))
    # Keys a manifest may lack (vlmcache.cache.store.MANIFEST): an older vlmcache did not write them all.
    table.add_row("libraries", ", ".join(f"{k} {v}" for k, v in manifest.get("libraries", {}).items()))
    table.add_row("created / finished", f"{manifest.get('created')} / {manifest.get('finished')}")
    skipped = manifest.get("skipped", [])
    table.add_row("skipped", f"{len(skipped)} items" + "".join(
        f"\n  {s['modality']} row {s['row']} {s['item']}: {s['reason']}" for s in skipped[:10]))
    table.add_row("truncated captions", str(manifest.get("truncated_captions", 0)))
    console.print(table)


@app.command(epilog="Examples:\n\n  vlmcache verify features/flickr8k\n\n  vlmcache verify runs/mlp-infonce")
def verify(path: Annotated[Path, typer.Argument(help="Cache folder or run folder.")]) -> None:
    """Check every file of a cache (shards: checksums, content hashes, row ranges, provenance, finite features;
    index.h5 and the saved text encoder: content hashes) or of a run (checkpoints, search indexes: content hashes)."""
    from vlmcache.cache.store import verify_cache

    if path.is_dir() and not (path / "manifest.json").exists() and any(path.glob("*.safetensors")):
        from vlmcache.app.search_index import verify_run

        problems = verify_run(path)
    else:
        problems = verify_cache(path)
    if not problems:
        console.print(f"[green]ok[/green] {path}: every file reads back whole and matches what was recorded when it "
                      "was written")
        return
    table = Table(title=f"bad files in {path}", title_justify="left")
    table.add_column("file", no_wrap=True)
    table.add_column("problem")
    for file, problem in problems:
        table.add_row(file, problem)
    console.print(table)
    raise VlmcacheError(f"{path}: {len(problems)} bad file(s); first {problems[0][0]}: {problems[0][1]}")


def _with_config_file(context: typer.Context, config_file: Path | None, options: dict, extra: dict | None = None,
                      what: str = "vlmcache train") -> tuple[dict, dict]:
    """Options with values from a TOML --config file wherever the command line did not set them.

    Every key of the file is checked against the type of its option (TrainConfig's, or `extra`'s); returns
    (merged options, the file's remaining keys).
    """
    if config_file is None:
        return options, {}
    from vlmcache.align.config import read_config_file

    values = read_config_file(config_file, extra, what)
    # Compared by name: typer ≥ 0.2x has its own copy of click, with its own ParameterSource enum.
    merged = {name: values[name] if name in values and getattr(context.get_parameter_source(name), "name", None)
              != "COMMANDLINE" else value for name, value in options.items()}
    return merged, {key: value for key, value in values.items() if key not in options}


@app.command(epilog="Examples:\n\n  vlmcache train features/flickr8k --projector mlp --loss infonce --out runs/mlp-infonce\n\n"
                    "  vlmcache train features/flickr8k --projector ndlinear --loss sigmoid --epochs 30 --out runs/nd\n\n"
                    "  vlmcache train features/flickr8k --out runs/mlp-infonce --resume\n\n"
                    "  vlmcache train features/laion --stream --max-memory 4GB --out runs/laion\n\n"
                    "  torchrun --nproc-per-node 2 -m vlmcache train features/laion --out runs/laion-2\n\n"
                    "  vlmcache train features/flickr8k-tokens --projector cross-attention --queries 4 --out runs/xattn")
@with_options(TrainConfig)
def train(
    context: typer.Context,
    options: dict,
    cache: Annotated[Path | None, typer.Argument(help="Cache folder written by vlmcache extract [default: the --config file's cache].")] = None,
    out: Annotated[Path, typer.Option(help="Run folder for checkpoints and metrics.jsonl.")] = Path("runs/latest"),
    text_cache: Annotated[Path | None, typer.Option(help="Take text features from this cache (same dataset).")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda | auto")] = "cpu",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out exactly where it stopped.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start the run in --out afresh.")] = False,
    config_file: Annotated[Path | None, typer.Option("--config", help="TOML file of these options (e.g. a run's config.toml); options given here override it.")] = None,
) -> None:
    """Train image and text projectors on cached features (seconds on a CPU); checkpoints as safetensors."""
    from rich.live import Live

    from vlmcache import distributed
    from vlmcache.align.config import TrainConfig
    from vlmcache.app.workflows import train as run_train
    from vlmcache.metrics.retrieval import RETRIEVAL_KEYS, RETRIEVAL_LABELS

    options, rest = _with_config_file(context, config_file, {**options, "cache": cache, "text_cache": text_cache},
                                      extra={"cache": (str, None), "text_cache": (str | None, None)})
    cache, text_cache = options.pop("cache"), options.pop("text_cache")
    if cache is None:
        raise VlmcacheError("give the CACHE folder (or a --config file with a cache key)")
    config = TrainConfig.from_dict({**rest, **options})
    table = Table(title=f"{config.projector} + {config.loss} on {cache} (validation recall, %)", title_justify="left")
    for column in ("epoch", "loss", "scale", *RETRIEVAL_LABELS, "s"):
        table.add_column(column, justify="right")
    quiet = not distributed.is_main_process()  # under torchrun only rank 0 prints
    with Live(table, console=Console(quiet=True) if quiet else console, refresh_per_second=4):
        result = run_train(cache, out, config, text_cache=text_cache, resume=resume, overwrite=overwrite,
                           device=device, on_epoch=lambda r: table.add_row(
                               str(r["epoch"]), f"{r['train_loss']:.4f}", f"{r['logit_scale']:.1f}",
                               *(f"{r['val_' + key]:.1f}" for key in RETRIEVAL_KEYS), f"{r['seconds']:.2f}"))
    if quiet:
        return
    best = result.best_metrics
    console.print(f"best epoch {result.best_epoch}: val mean recall {best['mean_recall']:.2f} "
                  f"(R@1 i→t {best['i2t_r1']:.1f}, t→i {best['t2i_r1']:.1f}); {result.parameters:,} projector "
                  f"parameters; {result.seconds:.1f} s; checkpoints in {result.out}")


@app.command("eval", epilog="Examples:\n\n  vlmcache eval runs/mlp-infonce\n\n"
                            "  vlmcache eval runs/mlp-infonce --split test --json results.json\n\n"
                            "  vlmcache eval runs/mlp-infonce --zero-shot features/cifar10 --ensemble")
def eval_command(
    checkpoint: Annotated[Path, typer.Argument(help="Run folder (uses its best checkpoint) or a .safetensors file.")],
    split: Annotated[str | None, typer.Option(help="Split to evaluate [default: test if the cache has it, else val]")] = None,
    cache: Annotated[Path | None, typer.Option(help="Cache to evaluate on [default: the one it was trained on]")] = None,
    baselines: Annotated[bool, typer.Option(help="Also show CCA and ASIF, fitted on the train split.")] = True,
    zero_shot: Annotated[Path | None, typer.Option(help="Also report zero-shot accuracy on this labelled-folder cache.")] = None,
    ensemble: Annotated[bool, typer.Option("--ensemble", help="Zero-shot with an 8-template prompt ensemble.")] = False,
    class_names: Annotated[Path | None, typer.Option(help='Zero-shot: JSON {"folder_name": "words for the prompt"} [default: folder names cleaned into words]')] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the numbers to this JSON file, and every row's per-query ranks beside it (.npz; vlmcache compare reads them).")] = None,
    qbnorm: Annotated[bool, typer.Option(help="Also the trained model and CCA with querybank normalisation (QB-Norm: bank of training queries, beta chosen on val).")] = True,
    qbnorm_bank: Annotated[str | None, typer.Option(help="Split whose queries form the QB-Norm bank [default: the run's train split]; never the evaluated split.")] = None,
) -> None:
    """Image↔text Recall@1/5/10 (5 captions per image) of a checkpoint beside untrained and training-free baselines."""
    from vlmcache.eval.evaluate import evaluate_checkpoint, read_class_names
    from vlmcache.eval.evaluate import zero_shot as run_zero_shot
    from vlmcache.files import check_writable, write_json_atomic
    from vlmcache.metrics.retrieval import ZERO_SHOT_KEYS, ZERO_SHOT_LABELS
    from vlmcache.run.ranks import ranks_path, save_ranks

    if json_out is not None:
        check_writable(json_out, "--json")  # before the work, not after it
    names = read_class_names(class_names)
    report = evaluate_checkpoint(checkpoint, split, cache, with_baselines=baselines, qbnorm=qbnorm, qbnorm_bank=qbnorm_bank)
    console.print(report_table(report))
    results: dict = {"split": report.split, "cache": str(report.cache), "retrieval": report.rows, "items": report.items,
                     "selected_on": report.selected_on, "statistics": report.statistics}
    if zero_shot is not None:
        accuracy = run_zero_shot(checkpoint, zero_shot, ensemble, class_names=names)
        table = Table(title=f"zero-shot on {zero_shot} ({'8-template ensemble' if ensemble else 'a photo of a {}.'})",
                      caption="top-5 is n/a with fewer than 5 classes (any model would score 100)", title_justify="left")
        table.add_column("model")
        for column in ZERO_SHOT_LABELS:
            table.add_column(column, justify="right")
        for name, m in accuracy.items():
            table.add_row(name, *("n/a" if m[key] is None else f"{m[key]:.1f}" for key in ZERO_SHOT_KEYS))
        console.print(table)
        results["zero_shot"] = accuracy
    if json_out is not None:
        save_ranks(ranks_path(json_out), report.ranked)
        write_json_atomic(json_out, {**results, "ranks": ranks_path(json_out).name})
        console.print(f"wrote {json_out} and its per-query ranks {ranks_path(json_out)}")


@app.command(epilog="Examples:\n\n  vlmcache compare runs/linear-infonce runs/mlp-infonce\n\n"
                    "  vlmcache compare a.json b.json          (the .npz ranks written by eval --json: no re-embedding)\n\n"
                    "  vlmcache compare 'a.json#CCA (closed form)' a.json\n\n"
                    "  vlmcache compare runs/ablation/cells/<key>.npz runs/ablation/cells/<other>.npz")
def compare(
    run_a: Annotated[str, typer.Argument(help="A run folder or checkpoint, an eval --json file or its .npz, or an ablation cell's .npz; PATH#ROW picks a row.")],
    run_b: Annotated[str, typer.Argument(help="The result to compare it with (same kinds).")],
    cache: Annotated[Path | None, typer.Option(help="Rank run folders on this cache (default: each run's own).")] = None,
    split: Annotated[str | None, typer.Option(help="Split to rank run folders on (default: test if the cache has it, else val).")] = None,
    test: Annotated[str, typer.Option(help="p-value: permutation (sign flips per image) | bootstrap (paired).")] = "permutation",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the comparison to this JSON file.")] = None,
) -> None:
    """Paired difference A − B of every retrieval metric on the same images, with its 95% interval and p-value."""
    from dataclasses import asdict

    from vlmcache.eval.compare import COMPARISON_NOTE
    from vlmcache.eval.compare import compare as run_compare
    from vlmcache.files import check_writable, write_json_atomic

    if json_out is not None:
        check_writable(json_out, "--json")
    result = run_compare(run_a, run_b, cache, split, test)
    table = Table(title=f"A = {run_a}\nB = {run_b}\non split {result.split!r}: {result.images:,} images, "
                        f"{result.captions:,} captions (recall in %)", title_justify="left",
                  caption=f"{COMPARISON_NOTE}; p by {result.test}", caption_justify="left")
    for column in ("metric", "A", "B", "A − B", "95% interval", "p"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for metric, m in result.metrics.items():
        label = "mean recall" if metric == "mean_recall" else metric.replace("i2t_r", "i→t R@").replace("t2i_r", "t→i R@")
        table.add_row(label, f"{m['a']:.2f}", f"{m['b']:.2f}", f"{m['difference']:+.2f}",
                      f"[{m['ci_low']:+.2f}, {m['ci_high']:+.2f}]", f"{m['p_value']:.3f}")
    console.print(table, highlight=False)
    if json_out is not None:
        write_json_atomic(json_out, asdict(result))
        console.print(f"wrote {json_out}")


def _read_labels(labels: str | None, labels_file: Path | None) -> list[str]:
    if labels_file is not None:
        if not labels_file.is_file():
            raise VlmcacheError(f"--labels-file {labels_file}: file not found")
        try:
            return labels_file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise VlmcacheError(f"--labels-file {labels_file}: not UTF-8 text; save it as UTF-8, one label per line") from None
    if labels:
        return labels.split(",")
    raise VlmcacheError("give --labels 'a,b,c' or --labels-file FILE")


@app.command(epilog='Examples:\n\n  vlmcache classify photo.jpg --labels "a dog,a cat,a car" --checkpoint runs/mlp-infonce\n\n'
                    "  vlmcache classify photo.jpg --labels-file labels.txt --template 'a photo of {}.' --checkpoint runs/x")
def classify(
    image: Annotated[Path, typer.Argument(help="An image file.")],
    checkpoint: Annotated[Path, typer.Option(help="Run folder or .safetensors checkpoint.")] = Path("runs/latest"),
    labels: Annotated[str | None, typer.Option(help="Comma-separated labels.")] = None,
    labels_file: Annotated[Path | None, typer.Option(help="A text file with one label per line.")] = None,
    template: Annotated[str, typer.Option(help="Prompt template; {} is replaced by the label.")] = "{}",
    label_list: Annotated[list[str] | None, typer.Option(hidden=True)] = None,
) -> None:
    """Rank text labels for one image: rank, prompt, cosine similarity and softmax probability."""
    from vlmcache.app.predictor import classify_image

    if not label_list:
        label_list = _read_labels(labels, labels_file)
    rows, scale = classify_image(checkpoint, image, label_list, template)
    console.print(ranking_table(image, rows, scale))


@app.command(epilog='Example:\n\n  vlmcache search runs/mlp-infonce "a dog running on a beach" --top 5')
def search(
    checkpoint: Annotated[Path, typer.Argument(help="Run folder or .safetensors checkpoint.")],
    query: Annotated[str, typer.Argument(help="What the images should show.")],
    top: Annotated[int, typer.Option(help="How many images.", min=1, max=10_000)] = 5,
    split: Annotated[str | None, typer.Option(help="Cached split to search [default: test, else val]")] = None,
    cache: Annotated[Path | None, typer.Option(help="Cache to search [default: the training cache]")] = None,
    qbnorm: Annotated[bool, typer.Option("--qbnorm", help="Rescore with querybank normalisation (bank: the run's training captions; beta chosen on val).")] = False,
) -> None:
    """Find the cached images that best match a text query (cross-modal retrieval)."""
    from vlmcache.app.search import search_images

    table = Table(title=f"top {top} images for {query!r}", title_justify="left")
    for column, justify in (("rank", "right"), ("score", "right"), ("image", "left"), ("path", "left")):
        table.add_column(column, justify=justify)
    for hit in search_images(checkpoint, query, top, split, cache, qbnorm):
        table.add_row(str(hit.rank), f"{hit.score:.4f}", hit.image_id, hit.path)
    console.print(table)


# The keys an ablate --config file may hold beside TrainConfig's: a grid axis is a comma-separated string or a list.
ABLATE_KEYS = {"caches": (list[str], None), "out": (str, None), "projectors": (str | list[str], None), "tune": (str | None, None),
               "losses": (str | list[str], None), "seeds": (str | list[int], None), "dims": (str | list[int], None),
               "jobs": (int | None, None), "baselines": (bool, None), "image_features": (str | list[str] | None, None),
               "text_features": (str | list[str] | None, None), "top": (int | None, None),
               "capacity": (str | list[int] | None, None)}


def _int_list(value, name: str) -> tuple[int, ...]:
    if isinstance(value, list | tuple) and all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        return tuple(value)
    try:
        return tuple(int(item) for item in value.split(",") if item.strip())
    except ValueError:
        raise VlmcacheError(f"--{name} {value}: give comma-separated integers, e.g. 0,1,2") from None


@app.command(epilog="Examples:\n\n  vlmcache ablate features/flickr8k\n\n"
                    "  vlmcache ablate features/vit features/resnet18 --projectors linear,mlp --losses infonce "
                    "--seeds 0,1 --epochs 10\n\n"
                    "  vlmcache ablate features/flickr8k --capacity 2k,30k,400k,2M --losses infonce   "
                    "(each projector at matched parameter counts; then vlmcache plot)")
def ablate(
    context: typer.Context,
    caches: Annotated[list[Path] | None, typer.Argument(help="One or more cache folders (several compare encoder pairs).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for cell results, ablation.json and ablation.csv.")] = Path("runs/ablation"),
    projectors: Annotated[str, typer.Option(help="Comma-separated: linear,mlp,ndlinear,cross-attention,resampler; token options after ':', e.g. cross-attention:queries=4,ndlinear:tokens")] = "linear,mlp,ndlinear",
    losses: Annotated[str, typer.Option(help="Comma-separated: infonce,sigmoid")] = "infonce,sigmoid",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; each cell runs once per seed.")] = "0,1,2",
    dims: Annotated[str, typer.Option(help="Comma-separated shared-space sizes.")] = "256",
    image_features: Annotated[str | None, typer.Option(help="Comma-separated image feature-set combinations to compare, e.g. efficientnet-lite0,efficientnet-lite0+efficientnet-lite2; 'auto': the --top pairs that vlmcache compat ranks best [default: the default set]")] = None,
    text_features: Annotated[str | None, typer.Option(help="Comma-separated text feature-set combinations [default: the default set]")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs per run (best epoch on val is kept).")] = 20,
    batch_size: Annotated[int, typer.Option(help="Pairs per step.")] = 256,
    tune: Annotated[str | None, typer.Option(help="Tune train options per cell, e.g. lr=3e-4,1e-3,3e-3,weight_decay=0.01,0.1: every combination is trained, each row reports the one best on the selection split (needs --select-on apart from the reported split); the table shows the chosen values")] = None,
    select_on: Annotated[str | None, typer.Option(help="Choose each cell's best epoch on this split, or on N images carved out of the training split (train:N, the same images for every cell); never the reported split (default: val)")] = None,
    jobs: Annotated[int | None, typer.Option(help="Cells trained in parallel [default: CPU cores]")] = None,
    baselines: Annotated[bool, typer.Option(help="Add untrained, CCA and ASIF rows.")] = True,
    config_file: Annotated[Path | None, typer.Option("--config", help="TOML file of these options (lists allowed, e.g. seeds = [0, 1]); any other train option in it (lr, dropout, ...) applies to every cell. Options given here override it.")] = None,
    log: Annotated[str | None, typer.Option(help="Record every cell trained, grouped under the grid, and the grid's tables and plot: tensorboard, mlflow, wandb (any, comma-separated).")] = None,
    log_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI; OUT/mlruns when not given.")] = None,
    top: Annotated[int | None, typer.Option(help="With --image-features auto: how many best-scoring (image, text) pairs to train [default: 3]")] = None,
    capacity: Annotated[str | None, typer.Option("--capacity", "--params", help="Comma-separated trainable-parameter targets, e.g. 2k,30k,400k,2M (k = 1,000, M = 1,000,000): each projector family is trained at each, sized by its knob (linear: --rank, mlp: --mlp-hidden, ndlinear: --ndlinear-hidden and --ndlinear-layers) to the closest count, image and text projector together; a family more than ±25% away is listed as unreachable")] = None,
) -> None:
    """Train the projector × loss grid on cached features (several seeds) and print one comparison table."""
    from vlmcache.align.ablate import parse_tune
    from vlmcache.app.workflows import ablate as run_ablate

    options, rest = _with_config_file(context, config_file, {
        "caches": caches, "out": out, "projectors": projectors, "losses": losses, "seeds": seeds, "dims": dims,
        "epochs": epochs, "batch_size": batch_size, "jobs": jobs, "baselines": baselines,
        "image_features": image_features, "text_features": text_features, "select_on": select_on, "tune": tune,
        "log": log, "log_uri": log_uri, "top": top, "capacity": capacity}, extra=ABLATE_KEYS, what="vlmcache ablate")
    if not options["caches"]:
        raise VlmcacheError("give at least one CACHE folder (or a --config file with caches = [...])")
    result = run_ablate(options["caches"], options["out"], projectors=tuple(_split_list(options["projectors"]) or ()),
                        losses=tuple(_split_list(options["losses"]) or ()), seeds=_int_list(options["seeds"], "seeds"),
                        dims=_int_list(options["dims"], "dims"), epochs=options["epochs"], jobs=options["jobs"],
                        image_features=tuple(_split_list(options["image_features"]) or (None,)),
                        text_features=tuple(_split_list(options["text_features"]) or (None,)),
                        with_baselines=options["baselines"],
                        base_config={**rest, **{key: options[key] for key in ("batch_size", "select_on", "log", "log_uri")}},
                        tune=parse_tune(options["tune"]) if options["tune"] else None, top=options["top"],
                        capacity=options["capacity"])
    for pair in result.selected:
        console.print(f"auto: {pair['image_features']} + {pair['text_features']} ({pair['rank_by']} {pair['score']:.3f})")
    console.print(ablation_table(result.rows, result.split, result.selected_on))
    for miss in result.capacity.get("unreachable", []):
        console.print(f"unreachable: {escape(miss['projector'])} at {miss['capacity']:,} parameters: {escape(miss['reason'])}")
    console.print(f"{result.cells_trained} runs trained, {result.cells_reused} reused from {result.out}/cells; "
                  f"{result.seconds:.1f} s; wrote {result.out}/ablation.json and ablation.csv")


@app.command(epilog="Examples:\n\n  vlmcache demo                       (uses ../shared/data/flickr8k if present)\n\n"
                    "  vlmcache demo --data path/to/Flickr8k --limit 2000")
def demo(
    data: Annotated[Path | None, typer.Option(help="A Flickr8k-layout folder [default: ../shared/data/flickr8k, "
                                                      "else a generated dataset of coloured shapes]")] = None,
    out: Annotated[Path, typer.Option(help="Where the demo's cache and run go.")] = Path("features/demo"),
    limit: Annotated[int, typer.Option(help="Images per split to extract (keeps the demo a few minutes).")] = 2000,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 20,
) -> None:
    """The whole pipeline on the offline default encoders: extract → train (MLP + InfoNCE) → eval → classify."""
    from vlmcache.app.demo import run_demo

    result = run_demo(data, out, limit, epochs, on_step=console.rule)
    if result.generated:
        console.print(f"[yellow]No Flickr8k data found: generated a procedural dataset of coloured shapes with "
                      f"matching captions in {result.source} (synthetic pictures, not real photos).[/yellow]")
    console.print(report_table(result.report))
    console.print(f"true caption: {result.true_caption!r}")
    console.print(ranking_table(result.image, result.ranking, result.scale))


@app.command(epilog="Examples:\n\n  vlmcache plot runs/mlp-infonce          (writes runs/mlp-infonce/training.png)\n\n"
                    "  vlmcache plot runs/ablation              (writes runs/ablation/ablation.png)")
def plot(
    path: Annotated[Path, typer.Argument(help="A run folder (metrics.jsonl) or an ablation folder / ablation.json.")],
    out: Annotated[Path | None, typer.Option(help="PNG to write [default: beside the input]")] = None,
) -> None:
    """Plot training curves of a run, or the ablation as bars with error bars (with --capacity: recall against
    trainable parameters, one line per projector family), to a PNG."""
    from vlmcache.app.plots import plot_ablation, plot_training

    is_ablation = path.name == "ablation.json" or (path / "ablation.json").exists()
    written = plot_ablation(path, out) if is_ablation else plot_training(path, out)
    console.print(f"wrote {written}")


@app.command(epilog="Example:\n\n  vlmcache serve runs/mlp-infonce            (then open http://127.0.0.1:8000)")
def serve(
    checkpoint: Annotated[Path, typer.Argument(help="Run folder or .safetensors checkpoint.")],
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    split: Annotated[str | None, typer.Option(help="Cached split to search [default: test, else val]")] = None,
    qbnorm: Annotated[bool, typer.Option("--qbnorm", help="Search with querybank normalisation (bank: the run's training captions).")] = False,
    captioner: Annotated[Path | None, typer.Option(help="A captioner run: the same page also captions the photo.")] = None,
) -> None:
    """A local web page: upload an image and rank labels, or search the cached images by text."""
    from vlmcache.app.serve import serve as run_server

    console.print(f"serving {checkpoint} at http://{host}:{port} (Ctrl-C to stop)")
    run_server(checkpoint, host, port, split, qbnorm, captioner)


@app.command("export", epilog="Examples:\n\n  vlmcache export features/flickr8k --format clip-retrieval --out embeddings/flickr8k\n\n"
                              "  vlmcache export features/flickr8k --out embeddings/raw --raw --captions all --splits train")
def export_command(
    cache: Annotated[Path, typer.Argument(help="Cache folder.")],
    out: Annotated[Path, typer.Option(help="Folder for img_emb/, text_emb/ and metadata/.")],
    format: Annotated[str, typer.Option(help="clip-retrieval (npy + parquet, as its back-end and autofaiss read)")] = "clip-retrieval",
    raw: Annotated[bool, typer.Option("--raw", help="Keep features as stored instead of L2-normalised float16.")] = False,
    captions: Annotated[str, typer.Option(help="first: one row per image with its first caption; all: one row per caption.")] = "first",
    splits: Annotated[str | None, typer.Option(help="Comma-separated splits to export [default: all]")] = None,
    rows_per_file: Annotated[int, typer.Option(help="Rows per img_emb_N.npy / metadata_N.parquet.")] = 1_000_000,
) -> None:
    """Write a cache's embeddings and metadata in clip-retrieval's layout (chunked, memory-bounded)."""
    from vlmcache.data.formats import export_cache

    result = export_cache(cache, out, format, raw=raw, captions=captions, splits=_split_list(splits),
                          rows_per_file=rows_per_file)
    console.print(f"[green]exported[/green] {result.rows:,} rows in {result.files} file(s) per kind to {result.out} "
                  f"in {result.seconds:.1f} s")


@app.command("export-model", epilog="Example:\n\n  vlmcache export-model runs/mlp-infonce --format onnx --out exported/mlp-infonce\n\n"
                                    "  (docs/export.md: classify a photo with onnxruntime, tokenizers, numpy and Pillow alone)")
def export_model_command(
    run: Annotated[Path, typer.Argument(help="Run folder of vlmcache train (its best checkpoint) or a .safetensors file.")],
    out: Annotated[Path, typer.Option(help="New or empty folder for image.onnx, text.onnx, their JSON and tokenizer files.")],
    format: Annotated[str, typer.Option(help="onnx")] = "onnx",
) -> None:
    """Write a trained run's image side (frozen encoder + projector) and text side as ONNX graphs that embed
    with onnxruntime and tokenizers alone."""
    from vlmcache.app.export_model import export_model

    result = export_model(run, out, format)
    console.print(f"[green]exported[/green] {run} to {result.out}: image.onnx ({', '.join(result.image_encoders)}) "
                  f"and text.onnx ({', '.join(result.text_encoders)}) give {result.dim}-d unit embeddings; "
                  f"{len(result.files)} files in {result.seconds:.1f} s")


@app.command("import", epilog="Examples:\n\n  vlmcache import embeddings/ --format clip-retrieval --out features/imported\n\n"
                              "  vlmcache import datacomp/shards --format datacomp --features b32 --val-fraction 0.01 --out features/dc\n\n"
                              "  vlmcache import my-arrays/ --format npy --out features/mine   (img_emb.npy, text_emb.npy, metadata.parquet)")
def import_command(
    source: Annotated[Path, typer.Argument(help="Folder of precomputed embeddings and captions.")],
    out: Annotated[Path, typer.Option(help="Cache folder to write.")],
    format: Annotated[str, typer.Option(help="clip-retrieval | datacomp | npy")] = "clip-retrieval",
    features: Annotated[str | None, typer.Option(help="DataComp feature set, e.g. b32 or l14 [default: the only one]")] = None,
    caption_column: Annotated[str | None, typer.Option(help="Parquet caption column [default: caption; text for DataComp]")] = None,
    split_column: Annotated[str, typer.Option(help="Parquet column naming each row's split, when present.")] = "split",
    val_fraction: Annotated[float | None, typer.Option(help="Put this fraction of rows (seed 0) in val, the rest in train.")] = None,
    shard_size: Annotated[int, typer.Option(help="Rows per HDF5 shard (the unit of resume).")] = 65536,
    dtype: Annotated[str, typer.Option(help="float16 | float32 storage.")] = "float16",
    on_error: Annotated[str, typer.Option(help="fail: stop at the first NaN/inf row or empty caption; skip: record it and go on.")] = "fail",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing cache instead of resuming it.")] = False,
) -> None:
    """Make a vlmcache cache from precomputed embeddings (no extraction); train, eval and ablate then run on it."""
    from vlmcache.data.formats import import_embeddings

    result = import_embeddings(source, out, format, features=features, caption_column=caption_column,
                               split_column=split_column, val_fraction=val_fraction, shard_size=shard_size,
                               dtype=dtype, on_error=on_error, overwrite=overwrite)
    console.print(f"[green]cache ready[/green] {result.path}: {result.images:,} pairs imported ({result.shards_written} "
                  f"shards written, {result.shards_reused} reused) in {result.seconds:.1f} s")
    if result.skipped:
        console.print(f"[yellow]skipped {len(result.skipped)} rows[/yellow] (reasons in {result.path}/manifest.json)")


@app.command(epilog="Examples:\n\n  vlmcache probe features/cifar10\n\n"
                    "  vlmcache probe features/cifar10 --checkpoint runs/mlp-infonce --json probe.json")
def probe(
    cache: Annotated[Path, typer.Argument(help="Cache of a labelled image folder (root/<class>/*.jpg).")],
    checkpoint: Annotated[Path | None, typer.Option(help="Also probe the features after this run's image projector.")] = None,
    train_split: Annotated[str, typer.Option(help="Split to fit on; if the cache lacks it, a train/test split is carved.")] = "train",
    test_split: Annotated[str | None, typer.Option(help="Split to score on [default: test, else val]")] = None,
    test_fraction: Annotated[float, typer.Option(help="When carving: fraction of each class held out as test.")] = 0.5,
    val_fraction: Annotated[float, typer.Option(help="Fraction of each class of the training images used to choose C.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the carved splits.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the numbers to this JSON file.")] = None,
) -> None:
    """Linear-probe accuracy (scikit-learn LogisticRegression, C swept on a validation split) of cached image features."""
    from dataclasses import asdict

    from vlmcache.eval.probe import probe as run_probe

    result = run_probe(cache, checkpoint, train_split=train_split, test_split=test_split, test_fraction=test_fraction,
                       val_fraction=val_fraction, seed=seed)
    console.print(probe_table(result))
    console.print(f"{result.seconds:.1f} s")
    if json_out is not None:
        from vlmcache.files import write_json_atomic

        write_json_atomic(json_out, {**asdict(result), "cache": str(result.cache)})
        console.print(f"wrote {json_out}")


@app.command(epilog="Examples:\n\n  vlmcache compat features/flickr8k-multi\n\n"
                    "  vlmcache compat features/flickr8k-multi --sample 0 --k 20 --json compat.json\n\n"
                    "  vlmcache ablate features/flickr8k-multi --image-features auto --top 3   (trains the 3 best pairs)")
def compat(
    cache: Annotated[Path, typer.Argument(help="Cache folder with several image and/or text feature sets.")],
    split: Annotated[str, typer.Option(help="Split to score on (never the one you report).")] = "train",
    sample: Annotated[int, typer.Option(help="Image–caption pairs drawn from the split (one caption per image, fixed seed); 0: every image.")] = 2000,
    k: Annotated[int, typer.Option(help="Neighbours per row for mutual-kNN.")] = 10,
    combine: Annotated[int, typer.Option(help="Also score '+' concatenations of up to this many image sets (1: none).")] = 2,
    pool: Annotated[int, typer.Option(help="Concatenations are drawn from this many best single image sets.")] = 4,
    rank_by: Annotated[str, typer.Option(help="mutual_knn | cka | cka_debiased (mutual-kNN predicted trained recall best on Flickr8k; docs/results.md)")] = "mutual_knn",
    seed: Annotated[int, typer.Option(help="Seed of the sample.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every pair's scores to this JSON file.")] = None,
) -> None:
    """Rank a cache's (image set, text set) pairs by linear CKA and mutual-kNN alignment: seconds, no training."""
    from vlmcache.eval.compat import compat as run_compat
    from vlmcache.files import check_writable, write_json_atomic
    from vlmcache.metrics.compat import SCORE_LABELS, SCORES

    if json_out is not None:
        check_writable(json_out, "--json")
    result = run_compat(cache, split, sample, k, combine=combine, pool=pool, rank_by=rank_by, seed=seed)
    table = Table(title=f"encoder compatibility on split {result.split!r} of {cache}: {result.rows:,} image–caption "
                        f"pairs, k={result.k}, ranked by {SCORE_LABELS[result.rank_by]}", caption=result.note or None,
                  title_justify="left")
    for column in ("rank", "image features", "text features"):
        table.add_column(column, justify="right" if column == "rank" else "left")
    for score in SCORES:
        table.add_column(SCORE_LABELS[score], justify="right", style="bold" if score == result.rank_by else None)
    for rank, pair in enumerate(result.scores, 1):
        table.add_row(str(rank), pair.image_features, pair.text_set, *(f"{pair.score(s):.3f}" for s in SCORES))
    console.print(table)
    console.print(f"{len(result.scores)} pairs of {len(result.image_sets)} image × {len(result.text_sets)} text sets "
                  f"in {result.seconds:.1f} s")
    if json_out is not None:
        write_json_atomic(json_out, result.to_json())
        console.print(f"wrote {json_out}")


class _CaptionGroup(typer.core.TyperGroup):
    """`vlmcache caption IMAGE... --checkpoint RUN` is `vlmcache caption predict IMAGE...`: anything that is not
    a subcommand name or --help goes to `predict`, so the issue's interface and `caption train/eval` coexist."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["predict", *args]
        return super().parse_args(ctx, args)


caption_app = typer.Typer(cls=_CaptionGroup, no_args_is_help=True, rich_markup_mode="rich",
                          help="Captioning on cached image features: train a projector (+ decoder), score it with "
                               "BLEU/METEOR/ROUGE-L/CIDEr beside baselines, caption image files "
                               "(vlmcache caption IMAGE... --checkpoint RUN is caption predict).")


app.add_typer(caption_app, name="caption")


@caption_app.command("train", epilog="Examples:\n\n  vlmcache caption train features/flickr8k --out runs/caption\n\n"
                                     "  vlmcache caption train features/flickr8k-tokens --projector resampler --out runs/caption-resampler\n\n"
                                     "  vlmcache caption train features/flickr8k --decoder gpt2 --prefix-tokens 10 --out runs/clipcap")
@with_options(CaptionConfig)
def caption_train(
    options: dict,
    cache: Annotated[Path, typer.Argument(help="Cache folder of an image–caption dataset.")],
    out: Annotated[Path, typer.Option(help="Run folder for checkpoints and metrics.jsonl.")] = Path("runs/caption"),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out exactly.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start the run in --out again.")] = False,
) -> None:
    """Train a captioner on cached image features; the best epoch by validation CIDEr (greedy) is kept."""
    from vlmcache.app.workflows import train_captioner
    from vlmcache.caption.config import CaptionConfig

    config = CaptionConfig(**options)

    def show(record: dict) -> None:
        console.print(f"epoch {record['epoch']:>3}  loss {record['train_loss']:.3f}  val BLEU-4 {record['val_bleu4']:.1f}  "
                      f"CIDEr {record['val_cider']:.1f}  ({record['train_seconds']:.0f} s train, {record['seconds']:.0f} s total)")

    result = train_captioner(cache, out, config, resume=resume, overwrite=overwrite, device=device, on_epoch=show)
    best = result.best_metrics
    console.print(f"best epoch {result.best_epoch}: val BLEU-4 {best['bleu4']:.1f}, CIDEr {best['cider']:.1f} (greedy); "
                  f"{result.parameters:,} trained parameters; {result.seconds:.1f} s; checkpoints in {result.out}")


@caption_app.command("eval", epilog="Examples:\n\n  vlmcache caption eval runs/caption\n\n"
                                    "  vlmcache caption eval runs/caption --beam 1 --split val --json caption.json")
def caption_eval(
    run: Annotated[Path, typer.Argument(help="Captioning run folder (its best checkpoint) or .safetensors file.")],
    cache: Annotated[Path | None, typer.Option(help="Cache to caption [default: the training cache]")] = None,
    split: Annotated[str | None, typer.Option(help="Split [default: test if the cache has it, else val]")] = None,
    beam: Annotated[int, typer.Option(help="Beam width; 1 is greedy decoding.")] = 5,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics to this JSON file.")] = None,
) -> None:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (×100, all references) of a captioner beside the nearest-neighbour
    and most-frequent-caption baselines."""
    from vlmcache.caption.evaluate import evaluate_captioner
    from vlmcache.files import write_json_atomic
    from vlmcache.metrics.captions import java_available

    report = evaluate_captioner(run, cache, split, beam)
    if not java_available():
        console.print("[yellow]no java: METEOR skipped, captions tokenised in Python instead of the PTB tokenizer[/yellow]")
    console.print(caption_table(f"captioning on split {report.split!r} of {report.cache} (×100)", report.rows))
    for image_id, generated, reference in report.examples:
        console.print(f"{image_id}: {generated!r}  (a reference: {reference!r})")
    if json_out is not None:
        write_json_atomic(json_out, {"split": report.split, "cache": str(report.cache), "beam": report.beam,
                                     "captioning": report.rows, "statistics": report.statistics})
        console.print(f"wrote {json_out}")


@caption_app.command("predict", epilog="Examples:\n\n  vlmcache caption photo.jpg --checkpoint runs/caption\n\n"
                                       "  vlmcache caption predict a.jpg b.jpg --checkpoint runs/caption --beam 5")
def caption_predict(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    checkpoint: Annotated[Path, typer.Option(help="Captioning run folder or .safetensors file.")] = Path("runs/caption"),
    beam: Annotated[int, typer.Option(help="Beam width; 1 is greedy decoding.")] = 5,
) -> None:
    """Caption image files (also: vlmcache caption IMAGE... --checkpoint RUN)."""
    from vlmcache.caption.predict import caption_images

    for image, text in zip(images, caption_images(checkpoint, images, beam), strict=True):
        console.print(f"{image}: {text}", highlight=False)


def _print_error(errors: Console, error: VlmcacheError) -> None:
    # Literal (a path may hold "[/x]", which is rich markup) and on one line (a value may hold a newline).
    errors.print(f"[red]error:[/red] {escape(str(error))}".replace("\r", "\\r").replace("\n", "\\n"), markup=True)


def main() -> None:
    """Entry point: runs the app; user mistakes (bad options, bad files) print one line on stderr, exit 2."""
    errors = Console(stderr=True, soft_wrap=True, highlight=False, emoji=False)  # a value "train:x:" stays as typed
    try:
        code = app(standalone_mode=False)
    except VlmcacheError as error:
        _print_error(errors, error)
        sys.exit(2)
    except typer.TyperException as error:  # parsing: unknown option, not an integer, ... (typer's own click)
        command = error.ctx.command_path if getattr(error, "ctx", None) else "vlmcache"
        errors.print(f"error: {error.format_message()} (see {command} --help)".replace("\n", " "), markup=False)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        errors.print("interrupted; re-run the same command to resume", markup=False)
        sys.exit(130)
    except Exception as error:  # a full disk hit by a write outside vlmcache.files (a folder made, a library's own)
        if not is_disk_full(error):
            raise
        _print_error(errors, DiskFullError.from_error(error))
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)

