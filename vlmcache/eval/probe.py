"""Linear-probe classification on the cached image features of a labelled folder (CLIP_benchmark's protocol).

A scikit-learn `LogisticRegression` is fitted on L2-normalised features of the training images. Its
regularisation C is chosen on a validation split carved from the training images (stratified, seeded):
each C of the sweep is fitted on the rest of the training images and scored by top-1 on the validation
images; the best C is then refitted on all training images and scored once on the test images. Reported:
top-1 accuracy and mean per-class accuracy, beside chance and the majority-class guess. A cache with no
train split (a labelled folder is read as one "test" split) gets a stratified train/test split carved with
a fixed seed, and the result says so.

Each row measured on the test images (not chance, a constant) gets a 95% interval: a bootstrap over the
test images, the fitted probe fixed (it is the test set that is a sample here). The rows are compared with
the best one on the same images (paired bootstrap, Holm), as in the retrieval tables.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from vlmcache.align.load import check_encoders_match, load_model
from vlmcache.cache.store import open_cache
from vlmcache.encode import encoders
from vlmcache.errors import VlmcacheError
from vlmcache.metrics.stats import RESAMPLES, TableStats, bootstrap_table, method

C_SWEEP = tuple(float(c) for c in np.logspace(-2, 6, 9))  # 0.01 ... 1,000,000; features are unit vectors
ACCURACY_KEYS = ("top1", "mean_per_class")
CHANCE_ROW = "chance (baseline)"


@dataclass
class ProbeResult:
    """Accuracy rows (% top-1, % mean per class, chosen C) and how the images were split.

    Rows measured on the test images also hold <metric>_ci_low, _ci_high, _p_vs_best and _mark for top1 and
    mean_per_class (see accuracy_statistics); `statistics` says how they were made."""

    cache: Path
    rows: dict[str, dict] = field(default_factory=dict)
    classes: int = 0
    train_images: int = 0
    val_images: int = 0
    test_images: int = 0
    split_note: str = ""
    seconds: float = 0.0
    statistics: dict = field(default_factory=dict)


def class_accuracy(labels: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy and the mean over the classes present in `labels` of each class's accuracy (both %)."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    correct = labels == predicted
    per_class = [correct[labels == label].mean() for label in np.unique(labels)]
    return {"top1": 100.0 * float(correct.mean()), "mean_per_class": 100.0 * float(np.mean(per_class))}


def accuracy_statistics(labels: np.ndarray, predictions: list[np.ndarray], resamples: int = RESAMPLES,
                        seed: int = 0) -> TableStats:
    """95% intervals of top-1 and mean per-class accuracy (%) of several predictions of the same test
    `labels`, and per metric the best one and those not distinguishable from it: a bootstrap over the test
    images (paired across predictions, Holm; see vlmcache.metrics.stats.bootstrap_table).

    A replicate's mean per-class accuracy is over the classes it drew at least one image of."""
    labels = np.asarray(labels)
    one_hot = (labels[:, None] == np.unique(labels)[None]).astype(np.float64)  # (images, classes)
    correct = [(np.asarray(predicted) == labels).astype(np.float64) for predicted in predictions]

    def accuracies(weights: np.ndarray) -> np.ndarray:
        drawn = weights @ one_hot  # (replicates, classes): images drawn per class
        present = drawn > 0
        values = []
        for hits in correct:
            right = weights @ (hits[:, None] * one_hot)  # (replicates, classes): correct images drawn per class
            per_class = np.divide(right, drawn, out=np.zeros_like(right), where=present)
            values.append(np.stack([right.sum(1) / drawn.sum(1), per_class.sum(1) / present.sum(1)], axis=1))
        return 100.0 * np.stack(values)

    return bootstrap_table(accuracies, len(labels), ACCURACY_KEYS, resamples, seed=seed)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows, held-out rows): per class, round(fraction x count) rows drawn with `seed` are held out."""
    rng = np.random.default_rng(seed)
    held = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        held.extend(rng.permutation(rows)[:round(len(rows) * fraction)].tolist())
    held_out = np.zeros(len(labels), bool)
    held_out[held] = True
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)


def _fit(features: np.ndarray, labels: np.ndarray, c: float, seed: int) -> LogisticRegression:
    model = LogisticRegression(C=c, max_iter=1000, random_state=seed)
    # One BLAS/OpenMP thread: beside torch's own OpenMP pool in this process, more threads made each small
    # fit tens of times slower (measured: 42 s against 2 s for the synthetic probe test on 2 cores).
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # the largest Cs may stop at max_iter; the sweep ranks them
        return model.fit(features, labels)


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *, val_fraction: float = 0.2,
              seed: int = 0, cs: tuple[float, ...] = C_SWEEP) -> tuple[np.ndarray, float, float]:
    """(test predictions, chosen C, its validation top-1 %): C swept on a stratified validation part of the
    training rows, then refitted on all of them."""
    fit_rows, val_rows = stratified_split(train_y, val_fraction, seed)
    if len(val_rows) == 0 or len(fit_rows) == 0:
        raise VlmcacheError(f"{len(train_y)} training images are too few to carve a validation split; use more images")
    scores = {c: class_accuracy(train_y[val_rows], _fit(train_x[fit_rows], train_y[fit_rows], c, seed)
                                .predict(train_x[val_rows]))["top1"] for c in cs}
    best = max(cs, key=lambda c: (scores[c], -c))  # ties go to the stronger regularisation
    return _fit(train_x, train_y, best, seed).predict(test_x), best, scores[best]


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 val_fraction: float = 0.2, seed: int = 0, cs: tuple[float, ...] = C_SWEEP) -> dict:
    """Sweep C on a stratified validation part of the training rows, refit on all of them, score the test rows."""
    predicted, best, val_top1 = fit_probe(train_x, train_y, test_x, val_fraction=val_fraction, seed=seed, cs=cs)
    return {**class_accuracy(test_y, predicted), "C": best, "val_top1": val_top1}


def _unit(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.where(norms == 0, 1, norms)


def probe(cache: str | Path, checkpoint: str | Path | None = None, *, train_split: str = "train",
          test_split: str | None = None, test_fraction: float = 0.5, val_fraction: float = 0.2, seed: int = 0,
          cs: tuple[float, ...] = C_SWEEP, resamples: int = RESAMPLES, bootstrap_seed: int = 0) -> ProbeResult:
    """Linear-probe accuracy of a labelled-folder cache's image features, raw and after `checkpoint`'s image projector.

    Uses `train_split` and `test_split` (default: test, else val) when the cache has a train split;
    otherwise carves `test_fraction` of each class (seeded) as the test images. Rows measured on the test
    images get 95% intervals and marks (`resamples` replicates drawn with `bootstrap_seed`).
    """
    started = time.perf_counter()
    if not 0 < test_fraction < 1 or not 0 < val_fraction < 1:
        raise VlmcacheError("--test-fraction and --val-fraction must be between 0 and 1")
    opened = open_cache(cache)
    if not opened.classes:
        raise VlmcacheError(f"{cache}: has no class labels; probe needs a cache of a labelled image folder root/<class>/*.jpg")
    result = ProbeResult(Path(cache), classes=len(opened.classes))
    if train_split in opened.splits:
        test_split = test_split or ("test" if "test" in opened.splits else "val")
        train, test = opened.split(train_split), opened.split(test_split)
        train_x, train_y, test_x, test_y = train.image_features, train.image_labels, test.image_features, test.image_labels
        result.split_note = f"train split {train_split!r}, test split {test_split!r}"
    else:
        only = test_split or opened.splits[0]
        whole = opened.split(only)
        keep, held = stratified_split(whole.image_labels, test_fraction, seed)
        train_x, train_y = whole.image_features[keep], whole.image_labels[keep]
        test_x, test_y = whole.image_features[held], whole.image_labels[held]
        result.split_note = (f"no {train_split!r} split in the cache: carved from split {only!r}, per class "
                             f"{test_fraction:.0%} held out as test with seed {seed} ({len(keep)} train / {len(held)} test)")
    result.train_images, result.test_images = len(train_y), len(test_y)
    result.val_images = len(stratified_split(train_y, val_fraction, seed)[1])
    encoder = encoders.describe(opened.provenance["images"]["encoder"])
    sets = {f"raw features ({encoder})": (train_x, test_x)}
    if checkpoint is not None:
        model, meta = load_model(checkpoint)
        check_encoders_match(meta, opened, ("images",))
        if meta["config"].get("tokens"):  # the probe reads pooled features; token states would need their own split
            raise VlmcacheError(f"--checkpoint {checkpoint}: its image projector reads token states; probe "
                                "supports pooled-feature checkpoints (linear, mlp, ndlinear without --tokens)")
        with torch.no_grad():
            sets[f"after image projector ({meta['config']['projector']}, {checkpoint})"] = tuple(
                model.embed_images(torch.from_numpy(x)).numpy() for x in (train_x, test_x))
    predictions = {}
    for name, (fit_x, eval_x) in sets.items():
        predictions[name], best, val_top1 = fit_probe(_unit(fit_x), train_y, _unit(eval_x), val_fraction=val_fraction,
                                                      seed=seed, cs=cs)
        result.rows[name] = {**class_accuracy(test_y, predictions[name]), "C": best, "val_top1": val_top1}
    name = "majority class of train (baseline)"
    predictions[name] = np.full(len(test_y), np.bincount(train_y).argmax())
    result.rows[name] = {**class_accuracy(test_y, predictions[name]), "C": None, "val_top1": None}
    table = accuracy_statistics(test_y, list(predictions.values()), resamples, bootstrap_seed)
    for index, name in enumerate(predictions):
        result.rows[name].update(table.row(index))
    # Chance is a number, not a measurement on the test images: it has no interval and takes no part in the test.
    result.rows[CHANCE_ROW] = {"top1": 100.0 / result.classes, "mean_per_class": 100.0 / result.classes,
                               "C": None, "val_top1": None}
    result.statistics = method("the test images", resamples, bootstrap_seed)
    result.seconds = time.perf_counter() - started
    return result
