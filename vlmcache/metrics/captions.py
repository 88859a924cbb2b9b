"""Caption metrics and the training-free caption baselines.

Scores come from `pycocoevalcap` (the COCO caption evaluation code): BLEU-1..4, METEOR, ROUGE-L and
CIDEr-D against all references of each image, every one ×100 as papers print them. Captions are
tokenised by the Stanford PTB tokenizer of that package; it and METEOR run on Java. Without a `java`
on the PATH the captions are tokenised in Python (lower-case, punctuation-only tokens dropped, which is
what the PTB tokenizer does to these captions) and METEOR is reported as None, with a warning naming it.

Intervals (see caption_table_statistics): a bootstrap over the evaluated images, each with all its
references, recomputing every metric the way its corpus number is made. BLEU is a corpus statistic (clipped
n-gram matches, n-gram totals and lengths summed over the images, then one brevity penalty), so each
replicate sums the resampled images' counts; METEOR likewise from its per-image sufficient statistics
(METEOR 1.5's own aggregation, redone in numpy); ROUGE-L and CIDEr-D are means of per-image scores, so
each replicate is a weighted mean. CIDEr-D's document frequencies stay those of all evaluated references
(fixed, as pycocoevalcap computes them once).

Baselines: the nearest-neighbour captioner (Devlin et al. 2015, "Exploring nearest neighbor approaches
for image captioning") and the constant most-frequent caption.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vlmcache.errors import VlmcacheError
from vlmcache.metrics.stats import RESAMPLES, TableStats, bootstrap_table, weighted_mean

METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
METRIC_LABELS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
# METEOR 1.5's parameters for English (-l en, the default task, as pycocoevalcap runs it): alpha, beta, gamma,
# delta, and the weights of its exact / stem / synonym / paraphrase matches.
METEOR_ALPHA, METEOR_BETA, METEOR_GAMMA, METEOR_DELTA = 0.85, 0.2, 0.6, 0.75
METEOR_WEIGHTS = np.array([1.0, 0.6, 0.8, 0.6])
# pycocoevalcap's BLEU smoothing: a ratio with no n-gram at all is 1e-15 / 1e-9, not 0 / 0.
BLEU_TINY, BLEU_SMALL = 1e-15, 1e-9


def words(text: str) -> list[str]:
    """Lower-case words of a caption; tokens made only of punctuation are dropped (as the PTB tokenizer
    of the COCO evaluation drops them)."""
    return [word for word in text.lower().split() if re.search(r"\w", word)]


def java_available() -> bool:
    """Whether METEOR and the PTB tokenizer can run (they are Java programs)."""
    return shutil.which("java") is not None


@contextmanager
def _child_stderr_silenced() -> Iterator[None]:
    """Child processes started in the block write their stderr to /dev/null.

    The PTB tokenizer (a Java process pycocoevalcap starts with our stderr) reports its speed there on every
    call; those lines would sit above a failure's one-line error. pycocoevalcap gives no way to redirect it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tokenize(captions: dict[int, list[str]], java: bool) -> dict[int, list[str]]:
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        with _child_stderr_silenced():
            return PTBTokenizer().tokenize({key: [{"caption": c} for c in values] for key, values in captions.items()})
    return {key: [" ".join(words(c)) for c in values] for key, values in captions.items()}


@dataclass(frozen=True)
class CaptionScores:
    """One captioner's metrics on a set of images (`scores`, as score_captions returns them) and the
    per-image numbers they are made of, for the bootstrap (see replicates)."""

    scores: dict[str, float | None]
    bleu_counts: np.ndarray  # (images, 10): length, closest reference length, n-grams 1..4, clipped matches 1..4
    meteor_stats: np.ndarray | None  # (images, 23): METEOR 1.5 sufficient statistics; None when METEOR did not run
    rouge_l: np.ndarray  # (images,) per-image ROUGE-L
    cider: np.ndarray  # (images,) per-image CIDEr-D (document frequencies of all the images' references)

    @property
    def images(self) -> int:
        return len(self.rouge_l)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics replicates gives, in METRICS order (METEOR only when it ran)."""
        return tuple(name for name in METRICS if name != "meteor" or self.meteor_stats is not None)

    def replicates(self, weights: np.ndarray) -> np.ndarray:
        """(replicates, metrics) ×100, each row of `weights` (replicates, images) weighting the images; all
        ones give `scores` again."""
        columns = [bleu_from_counts(weights @ self.bleu_counts)]
        if self.meteor_stats is not None:
            columns.append(meteor_from_stats(weights @ self.meteor_stats)[:, None])
        columns.append(weighted_mean(np.stack([self.rouge_l, self.cider], axis=1), weights))
        return 100 * np.concatenate(columns, axis=1)


def bleu_from_counts(totals: np.ndarray) -> np.ndarray:
    """Corpus BLEU-1..4 (fractions, last axis) from summed per-image counts (..., 10) laid out as in
    CaptionScores.bleu_counts, computed as pycocoevalcap's BleuScorer does (its smoothing, one brevity
    penalty from the summed lengths)."""
    test_length, reference_length = totals[..., 0], totals[..., 1]
    precisions = (totals[..., 6:10] + BLEU_TINY) / (totals[..., 2:6] + BLEU_SMALL)
    bleu = np.cumprod(precisions, axis=-1) ** (1.0 / np.arange(1, 5))
    ratio = (test_length + BLEU_TINY) / (reference_length + BLEU_SMALL)
    penalty = np.exp(1.0 - 1.0 / np.minimum(ratio, 1.0))  # 1 when the candidates are not shorter
    return bleu * penalty[..., None]


def meteor_from_stats(totals: np.ndarray) -> np.ndarray:
    """METEOR (a fraction) from summed per-image sufficient statistics (..., 23) as METEOR 1.5's
    MeteorScorer.computeMetrics makes its corpus score: weighted precision and recall of the matches, their
    recall-weighted harmonic mean, times one minus the fragmentation penalty (chunks per match)."""
    matches = totals[..., 4:20].reshape(totals.shape[:-1] + (4, 4))  # per module: test/reference content, function
    chunks, word_matches = totals[..., 20], totals[..., 21] + totals[..., 22]

    def weighted(side: int) -> tuple[np.ndarray, np.ndarray]:  # side 0: the candidate, 1: the reference
        length, function_words = totals[..., side], totals[..., 2 + side]
        content, function = matches[..., side], matches[..., 2 + side]
        return ((METEOR_DELTA * content + (1 - METEOR_DELTA) * function) @ METEOR_WEIGHTS,
                METEOR_DELTA * (length - function_words) + (1 - METEOR_DELTA) * function_words)

    with np.errstate(divide="ignore", invalid="ignore"):  # no match or an empty side: METEOR scores it 0
        precision, recall = (np.divide(*weighted(side)) for side in (0, 1))
        f_mean = 1.0 / ((1 - METEOR_ALPHA) / precision + METEOR_ALPHA / recall)
        fragmentation = np.where(_matched_in_one_chunk(totals), 0.0, chunks / (word_matches / 2))
        score = f_mean * (1 - METEOR_GAMMA * fragmentation ** METEOR_BETA)
    return np.maximum(np.nan_to_num(score, nan=0.0), 0.0)


def _matched_in_one_chunk(stats: np.ndarray) -> np.ndarray:
    """Where every word of both sides is matched, in one chunk: METEOR's "test = reference" case, no penalty."""
    matches = stats[..., 4:20].reshape(stats.shape[:-1] + (4, 4))
    return ((matches[..., 0::2].sum((-1, -2)) == stats[..., 0]) & (matches[..., 1::2].sum((-1, -2)) == stats[..., 1])
            & (stats[..., 20] == 1))


def _meteor_segments(lines: list[str]) -> np.ndarray:
    """Per-image METEOR statistics from its SCORE answers. A segment matched in one chunk counts no chunk, as
    METEOR's MeteorStats.addStats skips it when summing, so that the rows add up to the corpus statistics."""
    stats = np.array([[float(value) for value in line.split()] for line in lines]).reshape(len(lines), 23)
    stats[_matched_in_one_chunk(stats), 20] = 0
    return stats


def _meteor(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float, np.ndarray]:
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    lines: list[str] = []
    stat = scorer._stat
    # pycocoevalcap asks METEOR for each image's sufficient statistics (a SCORE line), sends them all back for
    # the corpus score (EVAL) and drops them: keep them, in image order, for the bootstrap.
    scorer._stat = lambda hypothesis, references: lines.append(stat(hypothesis, references)) or lines[-1]
    score, _ = scorer.compute_score(gts, res)
    if len(lines) != len(gts):  # a pycocoevalcap that no longer asks through _stat: fail rather than report 0
        raise RuntimeError(f"kept METEOR statistics of {len(lines)} of {len(gts)} images")
    return float(score), _meteor_segments(lines)


def _bleu(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[list[float], np.ndarray]:
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    # What pycocoevalcap's Bleu(4).compute_score does, keeping the scorer's per-image counts.
    scorer = BleuScorer(n=4)
    for key in gts:
        scorer += (res[key][0], gts[key])
    score, _ = scorer.compute_score(option="closest", verbose=0)
    counts = []
    for cooked in scorer.ctest:
        length = cooked["testlen"]
        closest = min((abs(reference - length), reference) for reference in cooked["reflen"])[1]
        counts.append([length, closest, *cooked["guess"], *cooked["correct"]])
    return score, np.array(counts, dtype=np.float64)


def caption_scores(candidates: list[str], references: list[list[str]], meteor: bool = True) -> CaptionScores:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (×100) of one candidate per image against its references, with the
    per-image numbers they are made of (see CaptionScores).

    METEOR is None when `meteor=False` (per-epoch validation skips its slow Java run) or Java is missing.
    """
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        raise VlmcacheError("caption metrics need pycocoevalcap: pip install 'vlmcache[caption]'") from None
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference lists")
    java = java_available()
    if not java:
        warnings.warn("no java on the PATH: METEOR is skipped (reported as None) and captions are tokenised in "
                      "Python instead of by the PTB tokenizer; install a Java runtime (Debian: default-jre-headless)",
                      stacklevel=2)
    gts = _tokenize(dict(enumerate(references)), java)
    res = _tokenize({i: [c] for i, c in enumerate(candidates)}, java)
    # ROUGE-L divides by the candidate's length: an empty caption is scored as one word that matches nothing.
    res = {key: [value[0] or "<empty>"] for key, value in res.items()}
    bleu, bleu_counts = _bleu(gts, res)
    scores: dict[str, float | None] = {f"bleu{n + 1}": 100 * float(value) for n, value in enumerate(bleu)}
    scores["meteor"], meteor_stats = None, None
    if meteor and java:
        meteor_score, meteor_stats = _meteor(gts, res)
        scores["meteor"] = 100 * meteor_score
    rouge, rouge_l = Rouge().compute_score(gts, res)
    cider, per_image_cider = Cider().compute_score(gts, res)
    scores["rouge_l"], scores["cider"] = 100 * float(rouge), 100 * float(cider)
    return CaptionScores({name: scores[name] for name in METRICS}, bleu_counts, meteor_stats,
                         np.asarray(rouge_l, np.float64), np.asarray(per_image_cider, np.float64))


def score_captions(candidates: list[str], references: list[list[str]], meteor: bool = True) -> dict[str, float | None]:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (×100) of one candidate per image against its references.

    METEOR is None when `meteor=False` (per-epoch validation skips its slow Java run) or Java is missing.
    """
    return caption_scores(candidates, references, meteor).scores


def caption_table_statistics(rows: list[CaptionScores], resamples: int = RESAMPLES, seed: int = 0) -> TableStats:
    """95% intervals of every row's metrics and, per metric, the best row and the rows not distinguishable
    from it (paired bootstrap over the images, Holm), for captioners scored on the same images."""
    if len({row.images for row in rows}) != 1 or len({row.metrics for row in rows}) != 1:
        raise ValueError("a caption table's rows must be scored on the same images with the same metrics")
    return bootstrap_table(lambda weights: np.stack([row.replicates(weights) for row in rows]), rows[0].images,
                           rows[0].metrics, resamples, seed=seed)


def nearest_neighbour_captions(train_images: np.ndarray, train_texts: np.ndarray, train_captions: list[str],
                               caption_image: np.ndarray, query_images: np.ndarray, k: int = 5) -> list[str]:
    """For each query image, the consensus caption of its `k` nearest training images (cosine on the
    cached image features): among those images' captions, the one whose cached text feature has the
    highest mean cosine to the others' (Devlin et al. 2015 pick the consensus caption the same way, with
    BLEU/CIDEr as the similarity; the cached sentence features make it a matrix product)."""
    images = F.normalize(torch.from_numpy(np.asarray(train_images, np.float32)), dim=-1)
    texts = F.normalize(torch.from_numpy(np.asarray(train_texts, np.float32)), dim=-1)
    queries = F.normalize(torch.from_numpy(np.asarray(query_images, np.float32)), dim=-1)
    rows_of = [np.flatnonzero(caption_image == image) for image in range(len(images))]
    chosen = []
    for start in range(0, len(queries), 512):
        nearest = torch.topk(queries[start:start + 512] @ images.T, min(k, len(images)), dim=1).indices
        for neighbours in nearest.tolist():
            rows = np.concatenate([rows_of[image] for image in neighbours])
            similarity = texts[rows] @ texts[rows].T
            mean_to_others = (similarity.sum(1) - similarity.diagonal()) / max(1, len(rows) - 1)
            chosen.append(train_captions[int(rows[int(torch.argmax(mean_to_others))])])
    return chosen


def most_frequent_caption(captions: list[str]) -> str:
    """The most frequent training caption (compared lower-cased, punctuation dropped; first seen wins a tie)."""
    if not captions:
        raise ValueError("no captions")
    return Counter(" ".join(words(caption)) for caption in captions).most_common(1)[0][0]
