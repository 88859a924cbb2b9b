"""Captioning: metrics and baselines on hand-checked cases, decoding on a decoder with a known answer,
training / resume / eval / predict through the CLI, the HF causal-LM path, the resampler, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CIFAR, run_cli
from safetensors.torch import load_file

from vlmcache import extract
from vlmcache.align.projectors import Resampler
from vlmcache.cache.store import open_cache
from vlmcache.caption.config import CaptionConfig
from vlmcache.caption.data import length_batches
from vlmcache.caption.decode import beam_search, greedy
from vlmcache.caption.evaluate import evaluate_captioner
from vlmcache.caption.model import SmallDecoder, load_captioner
from vlmcache.caption.predict import caption_images
from vlmcache.caption.train import train_captioner
from vlmcache.caption.vocab import build_vocabulary
from vlmcache.errors import VlmcacheError
from vlmcache.metrics.captions import (
    METRICS,
    bleu_from_counts,
    caption_scores,
    caption_table_statistics,
    java_available,
    meteor_from_stats,
    most_frequent_caption,
    nearest_neighbour_captions,
    score_captions,
    words,
)
from vlmcache.metrics.stats import BEST, TIED

TINY = {"width": 32, "layers": 1, "heads": 2, "min_count": 1, "batch_size": 8, "max_length": 8}


# --- metrics and baselines ------------------------------------------------------------------------------

def test_bleu_of_a_short_exact_prefix_is_its_brevity_penalty():
    # every n-gram of "a dog runs" is in the reference: precision 1 for n ≤ 3, times BP = exp(1 - 4/3)
    scores = score_captions(["a dog runs"], [["a dog runs fast"]], meteor=False)
    for n in (1, 2, 3):
        assert scores[f"bleu{n}"] == pytest.approx(100 * math.exp(-1 / 3), abs=1e-4)
    # no 4-gram at all: the COCO code smooths 0/0 to 1e-15/1e-9, so BLEU-4 = BP · (1e-6)^(1/4)
    assert scores["bleu4"] == pytest.approx(100 * math.exp(-1 / 3) * 1e-6 ** 0.25, abs=1e-4)


def test_identical_candidates_and_references_score_the_maximum():
    references = [["a black dog runs on the grass"], ["two children play in a fountain"], ["a man rides a red bicycle"]]
    scores = score_captions([r[0] for r in references], references)
    assert scores["bleu1"] == pytest.approx(100) and scores["bleu4"] == pytest.approx(100, abs=1e-4)
    assert scores["rouge_l"] == pytest.approx(100)
    # CIDEr-D: cosine 1 for every n, no length penalty, ×10 in its definition, ×100 here
    assert scores["cider"] == pytest.approx(1000, abs=1e-3)
    if java_available():
        assert scores["meteor"] > 95
    else:
        assert scores["meteor"] is None


def test_without_java_meteor_is_skipped_with_a_warning_not_a_crash(monkeypatch):
    monkeypatch.setattr("vlmcache.metrics.captions.java_available", lambda: False)
    with pytest.warns(UserWarning, match="METEOR is skipped"):
        scores = score_captions(["A dog runs ."], [["a dog runs fast"]])
    assert scores["meteor"] is None
    assert scores["bleu1"] == pytest.approx(100 * math.exp(-1 / 3), abs=1e-4)  # same words as the PTB tokenizer gives


# Six images, two to five references, candidates shorter and longer than their references (brevity penalty).
REFERENCES = [["a black dog runs on the green grass", "a dog running outside", "the dog is running in a field"],
              ["two children play in a fountain", "kids splash in the water"],
              ["a man rides a red bicycle down the street", "a cyclist on a road", "a man on a bike",
               "someone riding a red bike", "a person cycling in the city"],
              ["a cat sleeps on a sofa", "a grey cat asleep"],
              ["a woman in a red dress walks down the street", "a lady walking"],
              ["three people stand on a snowy mountain", "hikers on a mountain top", "people in the snow"]]
CANDIDATES = ["a dog runs on the grass", "children play in the water", "a man rides a bike", "a cat",
              "a woman walks down a street in a red dress", "people stand on a mountain in the snow"]
RESAMPLED = [0, 0, 2, 3, 5, 5, 5]  # one bootstrap draw: images 0 and 5 drawn more than once, 1 and 4 not at all


@pytest.mark.filterwarnings("ignore:no java on the PATH")
def test_bleu_from_per_image_counts_is_pycocoevalcaps_corpus_bleu_on_any_draw_of_images(monkeypatch):
    from pycocoevalcap.bleu.bleu import Bleu

    monkeypatch.setattr("vlmcache.metrics.captions.java_available", lambda: False)  # Python tokens: no Java needed
    scored = caption_scores(CANDIDATES, REFERENCES, meteor=False)

    def corpus_bleu(draw: list[int]) -> np.ndarray:
        gts = {key: [" ".join(words(r)) for r in REFERENCES[image]] for key, image in enumerate(draw)}
        res = {key: [" ".join(words(CANDIDATES[image]))] for key, image in enumerate(draw)}
        return 100 * np.array(Bleu(4).compute_score(gts, res, verbose=0)[0])

    everything = corpus_bleu(list(range(len(CANDIDATES))))
    assert [scored.scores[f"bleu{n}"] for n in (1, 2, 3, 4)] == pytest.approx(everything, rel=1e-12)
    assert 100 * bleu_from_counts(scored.bleu_counts.sum(axis=0)) == pytest.approx(everything, rel=1e-12)
    weights = np.bincount(RESAMPLED, minlength=len(CANDIDATES)).astype(float)
    assert 100 * bleu_from_counts(weights @ scored.bleu_counts) == pytest.approx(corpus_bleu(RESAMPLED), rel=1e-12)
    # A replicate of every metric with all weights one is the reported number.
    assert scored.replicates(np.ones((1, len(CANDIDATES))))[0] == pytest.approx(
        [scored.scores[name] for name in scored.metrics], rel=1e-12)
    assert "meteor" not in scored.metrics


@pytest.mark.skipif(not java_available(), reason="METEOR is a Java program")
def test_meteor_from_per_image_statistics_is_meteors_corpus_score_on_any_draw_of_images():
    from pycocoevalcap.meteor.meteor import Meteor

    scored = caption_scores(CANDIDATES, REFERENCES)
    assert 100 * meteor_from_stats(scored.meteor_stats.sum(axis=0)) == pytest.approx(scored.scores["meteor"], rel=1e-12)
    # The captions are lower-case words already: the PTB tokenizer leaves them as they are.
    gts = {key: REFERENCES[image] for key, image in enumerate(RESAMPLED)}
    res = {key: [CANDIDATES[image]] for key, image in enumerate(RESAMPLED)}
    weights = np.bincount(RESAMPLED, minlength=len(CANDIDATES)).astype(float)
    assert meteor_from_stats(weights @ scored.meteor_stats) == pytest.approx(Meteor().compute_score(gts, res)[0],
                                                                           rel=1e-12)
    assert scored.replicates(np.ones((1, len(CANDIDATES))))[0] == pytest.approx(
        [scored.scores[name] for name in METRICS], rel=1e-12)


@pytest.mark.filterwarnings("ignore:no java on the PATH")
def test_caption_intervals_zero_width_when_every_image_scores_the_same_and_fixed_by_the_seed(monkeypatch):
    monkeypatch.setattr("vlmcache.metrics.captions.java_available", lambda: False)
    perfect = caption_scores([r[0] for r in REFERENCES], [r[:1] for r in REFERENCES], meteor=False)
    table = caption_table_statistics([perfect])
    assert table.metrics == ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider")
    assert table.low[0] == pytest.approx(table.point[0], abs=1e-6) and table.high[0] == pytest.approx(table.point[0], abs=1e-6)
    scored = caption_scores(CANDIDATES, REFERENCES, meteor=False)
    first, again = caption_table_statistics([scored], seed=5), caption_table_statistics([scored], seed=5)
    assert np.array_equal(first.low, again.low) and np.array_equal(first.high, again.high)
    assert not np.array_equal(first.low, caption_table_statistics([scored], seed=6).low)
    assert np.all(first.low[0] <= first.point[0]) and np.all(first.point[0] <= first.high[0])
    # Rows on the same images are compared with the best one: an identical copy of it is not distinguishable.
    constant = caption_scores(["a"] * len(REFERENCES), REFERENCES, meteor=False)
    paired = caption_table_statistics([scored, scored, constant])
    assert paired.marks[0].tolist() == [BEST] * 6 and paired.marks[1].tolist() == [TIED] * 6
    assert paired.p_vs_best[1].tolist() == [1.0] * 6 and paired.p_vs_best[2, -1] < 0.05
    with pytest.raises(ValueError, match="same images"):
        caption_table_statistics([scored, caption_scores(CANDIDATES[:3], REFERENCES[:3], meteor=False)])


def test_nearest_neighbour_picks_the_consensus_caption_of_the_closest_image():
    train_images = np.array([[1.0, 0.0], [0.0, 1.0]])
    captions = ["cat one", "cat two", "cat three", "dog one", "dog two", "dog three"]
    owner = np.array([0, 0, 0, 1, 1, 1])
    # "dog two" is closest to the other two dog captions: the consensus for image 1
    texts = np.array([[1, 0, 0], [1, 0.1, 0], [1, 0, 0.1], [0, 1, 0], [0.1, 1, 0.2], [0.1, 1, 0.4]], dtype=float)
    queries = np.array([[0.1, 0.9], [0.8, 0.3]])
    chosen = nearest_neighbour_captions(train_images, texts, captions, owner, queries, k=1)
    assert chosen == ["dog two", "cat one"]


def test_most_frequent_caption_ignores_case_and_punctuation():
    assert most_frequent_caption(["A dog .", "a cat", "a dog", "a cat ."]) == "a dog"


# --- decoding -------------------------------------------------------------------------------------------

class TableDecoder(torch.nn.Module):
    """Next-token probabilities depend only on the current token: start -> A .6 / B .4; A -> end .34,
    A .33, B .33; B -> end 1. Greedy takes A then end (0.204); the best caption is B (0.4)."""

    start_id, end_id, vocabulary = 1, 2, 5
    table = {1: {3: 0.6, 4: 0.4}, 3: {2: 0.34, 3: 0.33, 4: 0.33}, 4: {2: 1.0}, 2: {2: 1.0}}

    def embed(self, ids):
        return F.one_hot(ids, self.vocabulary).float()

    def logits(self, embeds, cache=None):  # depends on the current token only: nothing to cache
        current = embeds.argmax(-1)
        out = torch.full((*current.shape, self.vocabulary), -1e9)
        for token, row in self.table.items():
            for following, p in row.items():
                out[..., following] = torch.where(current == token, math.log(p), out[..., following])
        return out

    def reorder(self, cache, rows):
        pass


class LengthDecoder(TableDecoder):
    """start -> A .55 / B .45; A -> end .52 / B .48; B -> end .6 / B .4. By total probability "A" (.286) beats
    "B" (.27) and "A B" (.1584); per token (length with the end token) "A B" (.1584^(1/3) = .5413) beats
    "A" (.286^(1/2) = .5348) and every other caption."""

    table = {1: {3: 0.55, 4: 0.45}, 3: {2: 0.52, 4: 0.48}, 4: {2: 0.6, 4: 0.4}, 2: {2: 1.0}}


def test_length_penalty_zero_is_total_log_probability_one_is_per_token():
    prefix = torch.zeros(1, 1, 5)
    assert beam_search(LengthDecoder(), prefix, beam=4, max_length=6, length_penalty=0.0) == [[3]]
    assert beam_search(LengthDecoder(), prefix, beam=4, max_length=6, length_penalty=1.0) == [[3, 4]]


def test_cached_decoding_equals_recomputing_every_position():
    torch.manual_seed(0)
    decoder = SmallDecoder(["<pad>", "<bos>", "<eos>", "<unk>", *"abcdefgh"], 32, 2, 2, 0.0, positions=40).eval()
    embeds = torch.randn(3, 9, 32)
    full = decoder.logits(embeds)
    cache: dict = {}
    steps = [decoder.logits(embeds[:, :4], cache)] + [decoder.logits(embeds[:, t:t + 1], cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="one new position"):
        decoder.logits(embeds[:, :2], {0: {"k": torch.zeros(3, 2, 1, 16), "v": torch.zeros(3, 2, 1, 16)}, "length": 1})


def test_greedy_and_beam_search_on_a_decoder_with_a_known_best_caption():
    prefix = torch.zeros(2, 1, 5)
    assert greedy(TableDecoder(), prefix, max_length=5) == [[3], [3]]
    assert beam_search(TableDecoder(), prefix, beam=2, max_length=5) == [[4], [4]]
    assert beam_search(TableDecoder(), prefix, beam=1, max_length=5) == [[3], [3]]


def test_length_limit_and_beam_one_equals_greedy_on_a_random_decoder():
    torch.manual_seed(0)
    decoder = SmallDecoder(["<pad>", "<bos>", "<eos>", "<unk>", *"abcdefgh"], 32, 2, 2, 0.0, positions=40).eval()
    decoder.end_id = 99  # an end token that is never produced: every caption runs to the length limit
    prefix = torch.randn(6, 3, 32)
    assert [len(ids) for ids in greedy(decoder, prefix, max_length=7)] == [7] * 6
    decoder.end_id = 2
    assert greedy(decoder, prefix, 12) == beam_search(decoder, prefix, 1, 12)
    assert beam_search(decoder, prefix, 4, 12) == beam_search(decoder, prefix, 4, 12)  # deterministic


def test_length_batches_cover_every_caption_once_with_equal_lengths():
    lengths = np.array([3, 5, 3, 5, 3, 7, 5, 3])
    batches = length_batches(lengths, 2, torch.Generator().manual_seed(0))
    assert sorted(np.concatenate(batches).tolist()) == list(range(8))
    assert all(len(set(lengths[b].tolist())) == 1 for b in batches if not (set(b.tolist()) & {5}))
    assert sum(len(set(lengths[b].tolist())) > 1 for b in batches) <= 1  # one mixed batch at most (5 + 7)


def test_vocabulary_keeps_frequent_words_most_frequent_first():
    vocabulary = build_vocabulary(["A dog runs .", "a dog sits", "a cat"], min_count=2)
    assert vocabulary == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "dog"]


# --- the resampler ----------------------------------------------------------------------------------------

def test_resampler_shape_and_masked_tokens_change_nothing():
    torch.manual_seed(0)
    resampler = Resampler(12, 16, latents=3, depth=2, heads=2, max_tokens=10).eval()
    tokens = torch.randn(2, 6, 12)
    padded = torch.cat([tokens, 100 * torch.randn(2, 4, 12)], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 4] * 2)
    assert resampler(tokens).shape == (2, 3, 16)
    assert torch.allclose(resampler(tokens), resampler(padded, mask), atol=1e-5)
    assert not torch.allclose(resampler(tokens), resampler(padded), atol=1e-3)


# --- training, resume, eval, predict ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def caption_cache(tmp_path_factory, tiny_models):
    from conftest import make_flickr_slice

    root = tmp_path_factory.mktemp("caption")
    data = make_flickr_slice(root / "flickr", 6, 4)
    extract(data, root / "cache", image_model=str(tiny_models["vit"]), text_model=str(tiny_models["distilbert"]),
            tokens=True, progress=False)
    return root / "cache"


@pytest.fixture(scope="module")
def caption_run(caption_cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("caption-run") / "run"
    train_captioner(caption_cache, run, CaptionConfig(epochs=1, **TINY))
    return run


def test_web_page_captions_an_uploaded_image(caption_run, caption_cache):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from vlmcache.app.serve import create_app

    client = TestClient(create_app(caption_run))
    assert "captioner" in client.get("/").text
    image = sorted((caption_cache.parent / "flickr" / "Images").iterdir())[0]
    reply = client.post("/caption", files={"image": ("photo.jpg", image.read_bytes(), "image/jpeg")})
    assert reply.status_code == 200 and isinstance(reply.json()["caption"], str)
    reply = client.post("/caption", files={"image": ("notes.txt", b"not an image", "text/plain")})
    assert reply.status_code == 400 and "notes.txt" in reply.json()["error"]


def test_cli_train_eval_predict_and_plot(caption_cache, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, err = run_cli(["caption", "train", caption_cache, "--out", run, "--epochs", "2", "--width", "32",
                              "--layers", "1", "--batch-size", "8"], capsys)
    assert code == 0, err
    assert "best epoch" in out and (run / "best.safetensors").exists() and (run / "last.safetensors").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and {"train_loss", "val_bleu4", "val_cider"} <= set(records[0])
    code, out, err = run_cli(["caption", "eval", run, "--beam", "2", "--json", tmp_path / "c.json"], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "c.json").read_text())["captioning"]
    names = list(rows)
    assert names[0].startswith("trained") and "nearest neighbour" in names[1] and "constant" in names[2]
    with_interval = [name for name in METRICS if name != "meteor" or java_available()]
    assert set(rows[names[0]]) == set(METRICS) | {f"{name}{suffix}" for name in with_interval
                                                  for suffix in ("_ci_low", "_ci_high", "_p_vs_best", "_mark")}
    for row in rows.values():
        assert row["cider_ci_low"] <= row["cider"] <= row["cider_ci_high"]
    assert sum(row["cider_mark"] == "best" for row in rows.values()) == 1 and "±" in out
    image = sorted((caption_cache.parent / "flickr" / "Images").iterdir())[0]
    code, out, err = run_cli(["caption", image, "--checkpoint", run, "--beam", "1"], capsys)
    assert code == 0, err
    assert out.startswith(str(image) + ":")
    code, out, err = run_cli(["plot", run], capsys)
    assert code == 0, err
    assert (run / "training.png").exists()


def test_interrupted_then_resumed_run_ends_with_the_same_weights(caption_cache, tmp_path):
    config = CaptionConfig(epochs=3, **TINY)
    train_captioner(caption_cache, tmp_path / "straight", config)

    def interrupt(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_captioner(caption_cache, tmp_path / "resumed", config, on_epoch=interrupt)
    torch.manual_seed(99)
    result = train_captioner(caption_cache, tmp_path / "resumed", config, resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    straight, resumed = (load_file(str(tmp_path / name / "last.safetensors")) for name in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_resampler_over_cached_tokens_trains_and_evaluates(caption_cache, tmp_path):
    result = train_captioner(caption_cache, tmp_path / "run", CaptionConfig(projector="resampler", epochs=1, **TINY))
    model, meta = load_captioner(tmp_path / "run")
    assert meta["token_count"] == 17 and isinstance(model.projector, Resampler)  # 4x4 patches + CLS of the tiny ViT
    report = evaluate_captioner(tmp_path / "run", beam=1, with_baselines=False)
    assert list(report.rows) == [next(iter(report.rows))] and result.best_epoch == 1


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, tiny_models):
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=64)).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_models["distilbert"] / name, folder / name)  # a WordPiece tokenizer: [CLS] starts, [SEP] ends
    return folder


def test_hf_causal_lm_frozen_by_default_and_tuned_on_request(caption_cache, tiny_gpt2, tmp_path):
    options = {k: v for k, v in TINY.items() if k not in ("width", "layers", "heads", "min_count")}
    train_captioner(caption_cache, tmp_path / "frozen", CaptionConfig(decoder=str(tiny_gpt2), projector="linear",
                                                                      epochs=1, **options), device="cpu")
    saved = load_file(str(tmp_path / "frozen" / "last.safetensors"))
    assert not any(name.startswith("model.decoder") for name in saved)  # the frozen LM is not copied
    model, _ = load_captioner(tmp_path / "frozen")
    from transformers import GPT2LMHeadModel

    original = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    assert all(torch.equal(a, b) for a, b in zip(model.decoder.lm.parameters(), original.parameters(), strict=True))
    assert model.prefix(torch.zeros(2, 32)).shape == (2, 4, 32)

    train_captioner(caption_cache, tmp_path / "tuned", CaptionConfig(decoder=str(tiny_gpt2), projector="linear",
                                                                     tune_lm=True, epochs=1, **options), device="cpu")
    tuned, _ = load_captioner(tmp_path / "tuned")
    assert any(not torch.equal(a, b) for a, b in zip(tuned.decoder.lm.parameters(), original.parameters(), strict=True))
    report = evaluate_captioner(tmp_path / "tuned", beam=2, with_baselines=False)
    assert next(iter(report.rows.values()))["cider"] >= 0


# --- bad input ------------------------------------------------------------------------------------------

def test_bad_input_is_one_line_and_exit_2(caption_cache, caption_run, tiny_models, tmp_path, capsys):
    cifar = tmp_path / "cifar"
    extract(CIFAR, cifar, image_model=str(tiny_models["vit"]), text_model=str(tiny_models["distilbert"]), limit=4,
            progress=False)
    pooled = tmp_path / "pooled"
    extract(caption_cache.parent / "flickr", pooled, image_model=str(tiny_models["vit"]),
            text_model=str(tiny_models["distilbert"]), progress=False)
    from vlmcache.align.config import TrainConfig
    from vlmcache.align.train import train

    train(caption_cache, tmp_path / "retrieval", TrainConfig(epochs=1, batch_size=4))
    cases = [
        (["caption", "train", cifar, "--out", tmp_path / "a"], "labelled image folder"),
        (["caption", "train", caption_cache, "--out", tmp_path / "b", "--decoder", tiny_models["vit"]],
         "not a causal language model"),
        (["caption", tmp_path / "missing.jpg", "--checkpoint", caption_run], "image file not found"),
        (["caption", "eval", tmp_path / "retrieval"], "not a captioner checkpoint"),
        (["caption", "train", pooled, "--out", tmp_path / "c", "--projector", "resampler"], "extract ... --tokens"),
        (["caption", "train", caption_cache, "--out", tmp_path / "d", "--freeze-lm"], "--freeze-lm"),
        (["caption", "train", caption_cache, "--out", caption_run], "already holds a run"),
    ]
    for args, message in cases:
        code, out, err = run_cli(args, capsys)
        assert code == 2, (args, out, err)
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)


def test_several_image_feature_sets_are_concatenated_in_training_eval_and_prediction(caption_cache, tiny_models, tmp_path):
    cache = tmp_path / "cache"
    extract(caption_cache.parent / "flickr", cache, image_model=str(tiny_models["vit"]),
            text_model=str(tiny_models["distilbert"]), extra_image_models=(str(tiny_models["resnet"]),), progress=False)
    opened = open_cache(cache)
    names = list(opened.feature_sets("images"))
    joined = "+".join(names)
    train_captioner(cache, tmp_path / "run", CaptionConfig(epochs=1, image_features=joined, **TINY))
    model, meta = load_captioner(tmp_path / "run")
    assert meta["image_dim"] == sum(opened.set_dims("images", tuple(names))) and len(meta["image_encoders"]) == 2
    report = evaluate_captioner(tmp_path / "run", beam=1)
    assert len(report.rows) == 3  # trained, nearest neighbour (on the same concatenated features), constant
    image = sorted((caption_cache.parent / "flickr" / "Images").iterdir())[0]
    assert isinstance(caption_images(tmp_path / "run", [image], beam=1)[0], str)  # both encoders ran on the file
    with pytest.raises(VlmcacheError, match="the resampler reads the tokens of one feature set"):
        CaptionConfig(projector="resampler", image_features=joined)
    with pytest.raises(VlmcacheError, match="has no such image feature set"):
        evaluate_captioner(tmp_path / "run", cache=caption_cache, beam=1)
