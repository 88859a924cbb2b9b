"""Token-level projectors: answers known by hand, masking, NdLinear's Kronecker form, and the token cache
end to end (train, resume, eval, search, ablate) with its bad inputs."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import make_flickr_slice, run_cli, train_killed_at_step
from safetensors.torch import save_file

from vlmcache.align.config import TrainConfig
from vlmcache.align.projectors import CrossAttentionProjector, NdLinear, ResamplerProjector, TokenNdLinearProjector
from vlmcache.errors import VlmcacheError


def _tokens(batch=5, count=7, channels=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, count, channels, generator=generator)
    mask = torch.ones(batch, count, dtype=torch.bool)
    mask[1, 4:] = False  # padded rows, as text tokens are
    mask[3, 1:] = False
    return states, mask


@pytest.mark.parametrize(("channels", "width", "queries"), [(12, 8, 1), (12, 8, 3), (8, 8, 2)])
def test_folded_attention_equals_multihead_attention(channels, width, queries):
    torch.manual_seed(0)
    projector = CrossAttentionProjector(channels, width, tokens=7, queries=queries, heads=2, dropout=0.5).eval()
    with torch.no_grad():  # non-zero biases too, so every term of the fold is checked
        projector.attention.in_proj_bias.normal_()
        projector.queries.normal_()
    states, mask = _tokens(channels=channels)
    expected, _ = projector.attention(projector.queries.expand(len(states), -1, -1), states, states,
                                      key_padding_mask=~mask, need_weights=False)
    torch.testing.assert_close(projector.attend(states, mask), expected, rtol=1e-5, atol=1e-5)


def test_one_query_with_equal_scores_is_mean_pooling_then_the_same_linear_maps():
    torch.manual_seed(0)
    projector = CrossAttentionProjector(12, 8, tokens=7, queries=1, heads=2)
    with torch.no_grad():  # query and its bias 0 -> every score 0 -> uniform attention over the real tokens
        projector.attention.in_proj_bias.normal_()
        projector.queries.zero_()
        projector.attention.in_proj_bias[:8].zero_()
    states, mask = _tokens()
    mean = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    attention = projector.attention
    _, _, b_v = attention.in_proj_bias.chunk(3)
    by_hand = projector.out(projector.norm(attention.out_proj(mean @ attention.v_proj_weight.T + b_v)))
    torch.testing.assert_close(projector(states, mask), by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [
    lambda: CrossAttentionProjector(12, 8, tokens=7, queries=2, heads=2, positions=True),
    lambda: ResamplerProjector(12, 8, tokens=7, queries=3, heads=2, depth=2),
    lambda: TokenNdLinearProjector(7, 12, 8),
])
def test_masked_tokens_change_nothing(build):
    torch.manual_seed(0)
    projector = build().eval()
    states, mask = _tokens()
    scrambled = torch.where(mask[..., None], states, torch.randn_like(states) * 100)
    assert not torch.equal(states, scrambled)
    torch.testing.assert_close(projector(scrambled, mask), projector(states, mask), rtol=0, atol=0)


def test_ndlinear_over_tokens_shape_and_kronecker_equivalence():
    projector = TokenNdLinearProjector(tokens=49, in_dim=1280, out_dim=256)
    assert projector(torch.randn(3, 49, 1280)).shape == (3, 256)
    assert sum(p.numel() for p in projector.parameters()) == 1280 * 16 + 16 + 49 * 16 + 16
    torch.manual_seed(0)
    nd = NdLinear((3, 4), (2, 5))
    w1, b1 = nd.align_layers[0].weight, nd.align_layers[0].bias  # (2, 3): the first axis
    w2, b2 = nd.align_layers[1].weight, nd.align_layers[1].bias  # (5, 4): the second axis
    x = torch.randn(6, 3, 4)
    # Y = W1 X W2ᵀ + b1 (W2 1)ᵀ + 1 b2ᵀ, i.e. vec(Y) = (W1 ⊗ W2) vec(X) + bias, rows flattened.
    bias = (b1[:, None] * w2.sum(1)[None, :] + b2[None, :]).flatten()
    expected = x.flatten(1) @ torch.kron(w1, w2).T + bias
    torch.testing.assert_close(nd(x).flatten(1), expected, rtol=1e-5, atol=1e-5)


def test_config_rules():
    assert TrainConfig(projector="cross-attention").tokens  # token-only projectors always read tokens
    assert not TrainConfig(projector="ndlinear").tokens
    with pytest.raises(VlmcacheError, match="--tokens: --projector linear reads pooled features"):
        TrainConfig(projector="linear", tokens=True)
    with pytest.raises(VlmcacheError, match="--standardize works on pooled features only"):
        TrainConfig(projector="resampler", standardize=True)


# ---- the token cache, end to end ----

@pytest.fixture(scope="module")
def token_cache(tmp_path_factory) -> Path:
    """6 train + 4 val real Flickr8k images, offline-default encoders, with token states (texts padded to 24)."""
    from vlmcache import extract

    root = tmp_path_factory.mktemp("tokens")
    extract(make_flickr_slice(root / "data", 6, 4), root / "cache", tokens=True, max_length=24, progress=False)
    return root / "cache"


@pytest.fixture(scope="module")
def token_run(token_cache, tmp_path_factory) -> Path:
    from vlmcache.align.train import train

    out = tmp_path_factory.mktemp("token-run") / "run"
    train(token_cache, out, TrainConfig(projector="cross-attention", queries=2, epochs=3, batch_size=4))
    return out


def test_mixed_pair_token_images_pooled_text(token_run):
    from vlmcache.align.load import load_model

    model, meta = load_model(token_run)
    assert (meta["image_tokens"], meta["text_tokens"]) == (49, None)
    assert isinstance(model.image, CrossAttentionProjector) and isinstance(model.text, torch.nn.Linear)


def test_resume_continues_exactly_and_eval_reads_the_checkpoint(token_cache, token_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from vlmcache.align.train import train

    def interrupt_after_first_epoch(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    config = TrainConfig(projector="cross-attention", queries=2, epochs=3, batch_size=4)
    with pytest.raises(KeyboardInterrupt):
        train(token_cache, tmp_path / "resumed", config, on_epoch=interrupt_after_first_epoch)
    train(token_cache, tmp_path / "resumed", config, resume=True)
    straight, resumed = (load_file(str(run / "last.safetensors")) for run in (token_run, tmp_path / "resumed"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    code, out, err = run_cli(["eval", token_run, "--no-qbnorm", "--json", tmp_path / "eval.json"], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "eval.json").read_text())["retrieval"]
    best = json.loads((token_run / "best.json").read_text())["best_metrics"]
    assert rows["trained (cross-attention + infonce)"]["mean_recall"] == pytest.approx(best["mean_recall"])
    assert "untrained (same init)" in rows and "CCA (closed form)" in rows


def test_search_and_classify_with_a_token_checkpoint(token_run):
    from conftest import SNOW_DOGS, SNOW_DOGS_LABELS

    from vlmcache.app.predictor import Predictor

    predictor = Predictor(token_run)
    hits = predictor.search("a dog", top=3, split="val")
    assert len(hits) == 3 and len({hit.image_id for hit in hits}) == 3
    rows, _ = predictor.rank_labels(SNOW_DOGS, SNOW_DOGS_LABELS)  # the image encoder's 7×7 tokens, not its pool
    assert sorted(row.prompt for row in rows) == sorted(SNOW_DOGS_LABELS)
    assert sum(row.probability for row in rows) == pytest.approx(1.0)
    searched, cached = predictor.searchable("val")
    with torch.no_grad():  # an uploaded image's tokens give the embedding its cached (fp16) tokens give
        uploaded = predictor.model.embed_images(predictor.image_features(searched.image_paths[0]))
    assert float(uploaded[0] @ cached[0]) > 0.999


def test_text_token_checkpoints_are_refused_for_new_queries(token_cache, tmp_path, capsys):
    from vlmcache.align.train import train

    train(token_cache, tmp_path / "run", TrainConfig(projector="ndlinear", tokens=True, text_tokens=True, epochs=1,
                                                     batch_size=4))
    code, _, err = run_cli(["search", tmp_path / "run", "a dog"], capsys)
    assert code == 2 and "--text-tokens" in err and len(err.strip().splitlines()) == 1


def test_ablate_grid_takes_token_projectors(token_cache, tmp_path):
    from vlmcache.align.ablate import ablate

    result = ablate([token_cache], tmp_path / "ablation", projectors=("cross-attention:queries=2", "ndlinear:tokens"),
                    losses=("infonce",), seeds=(0,), epochs=1, jobs=1, with_baselines=False, progress=False,
                    base_config={"batch_size": 4})
    rows = {row["projector"]: row for row in result.rows}
    assert set(rows) == {"cross-attention:queries=2", "ndlinear:tokens"}
    nd = rows["ndlinear:tokens"]  # NdLinear (49, 1280) -> (16, 16) images, linear 384 -> 256 texts
    assert nd["parameters"] == (49 * 16 + 16 + 1280 * 16 + 16) + (384 * 256 + 256) and nd["seconds"] > 0
    with pytest.raises(VlmcacheError, match="unknown option 'query'"):
        ablate([token_cache], tmp_path / "bad", projectors=("cross-attention:query=2",), progress=False)


# ---- bad input: one line, exit 2 ----

def _one_line_exit_2(args, capsys, *expected):
    code, _, err = run_cli(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err, err


def test_token_projector_on_a_cache_without_tokens(token_cache, tiny_models, tmp_path, capsys):
    from vlmcache import extract

    extract(token_cache.parent / "data", tmp_path / "pooled", image_model=str(tiny_models["vit"]),
            text_model=str(tiny_models["distilbert"]), progress=False)  # tiny encoders: seconds
    for streamed in ([], ["--stream"]):
        _one_line_exit_2(["train", tmp_path / "pooled", "--projector", "cross-attention", "--out", tmp_path / "run",
                          *streamed], capsys, "re-extract with vlmcache extract ... --tokens")


def test_token_shapes_that_disagree_with_the_checkpoint(token_run, tmp_path, capsys):
    from vlmcache.run.checkpoint import read_checkpoint

    tensors, header = read_checkpoint(token_run)
    meta = {**header["vlmcache"], "image_tokens": 36}  # as if trained on a 6×6 map
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={"vlmcache": json.dumps(meta)})
    _one_line_exit_2(["eval", tmp_path / "other.safetensors", "--no-qbnorm"], capsys,
                     "49×1280 token states but the checkpoint expects 36×1280 token states")


def test_captions_whose_mask_is_empty(token_cache, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(token_cache, cache)
    with h5py.File(cache / "texts" / "shard-00000.h5", "r+") as shard:
        shard["token_mask"][7] = np.zeros(shard["token_mask"].shape[1], bool)
    _one_line_exit_2(["train", cache, "--projector", "cross-attention", "--text-tokens", "--out", tmp_path / "run"],
                     capsys, "empty token mask", "row 7")
    _one_line_exit_2(["train", cache, "--projector", "cross-attention", "--text-tokens", "--out", tmp_path / "streamed",
                      "--stream", "--sampling", "caption"], capsys, "text rows with an empty token mask")


def test_token_shard_written_by_another_encoder(token_cache, tiny_models, tmp_path, capsys):
    from vlmcache import extract

    other = tmp_path / "vit"
    extract(token_cache.parent / "data", other, image_model=str(tiny_models["vit"]), tokens=True, max_length=24,
            progress=False)
    cache = tmp_path / "cache"
    shutil.copytree(token_cache, cache)
    shutil.copy(other / "images" / "shard-00000.h5", cache / "images" / "shard-00000.h5")
    _one_line_exit_2(["train", cache, "--projector", "resampler", "--out", tmp_path / "run"], capsys,
                     "made by a different encoder")


# ---- streamed token training ----

def test_streamed_batches_carry_the_token_states_of_their_rows(token_cache):
    from vlmcache.cache.store import load_features, open_cache
    from vlmcache.cache.stream import ShardStream, token_bytes

    cache = open_cache(token_cache)
    split = load_features(cache, "train", image_tokens=True, text_tokens=True)
    assert token_bytes(cache, "train", None, None, ("images", "texts")) == 6 * 49 * (1280 * 2 + 1) + 30 * 24 * (384 * 2 + 1)
    seen = []
    for batch in ShardStream(cache, "train", 4, seed=1, tokens=("images", "texts"), buffer=4).epoch(0):
        assert not batch.extra and batch.images.states.dtype == torch.float32
        for side, inputs in (("image", batch.images), ("text", batch.texts)):
            stored = torch.from_numpy(getattr(split, f"{side}_tokens").astype(np.float32))
            rows = [int(torch.nonzero((stored == states).all(dim=(1, 2)))[0]) for states in inputs.states]
            assert torch.equal(inputs.mask, torch.from_numpy(getattr(split, f"{side}_token_mask")[rows]))
            if side == "image":
                seen += rows
    assert sorted(seen) == list(range(6))  # sampling="image": every training image once


def test_streamed_token_run_resumes_mid_epoch_and_validates_on_the_token_states(token_cache, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from vlmcache.align.inputs import evaluate_model
    from vlmcache.align.load import load_model
    from vlmcache.align.train import train
    from vlmcache.cache.store import load_features, open_cache
    from vlmcache.cache.stream import embed_split
    from vlmcache.metrics.retrieval import retrieval_metrics

    monkeypatch.setattr(sys.modules["vlmcache.align.train"], "CHECKPOINT_STEPS", 1)
    config = TrainConfig(projector="cross-attention", text_tokens=True, epochs=2, batch_size=2, stream=True, stream_buffer=2)
    straight = train(token_cache, tmp_path / "straight", config)
    # 3 steps per epoch: killed in epoch 2 after its checkpoint at step 1
    train_killed_at_step(monkeypatch, 5, token_cache, tmp_path / "resumed", config)
    train(token_cache, tmp_path / "resumed", config, resume=True)
    first, second = (load_file(str(tmp_path / run / "last.safetensors")) for run in ("straight", "resumed"))
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)
    model, meta = load_model(tmp_path / "straight" / "last.safetensors")
    assert (meta["image_tokens"], meta["text_tokens"], meta["streamed"]["buffer"]) == (49, 24, 2)
    val = load_features(open_cache(token_cache), "val", image_tokens=True, text_tokens=True)
    chunked = retrieval_metrics(*embed_split(model, open_cache(token_cache), "val", tokens=("images", "texts")))
    assert chunked == pytest.approx(evaluate_model(model, val))  # the run validated on the same token states
    assert straight.history[-1]["val_mean_recall"] == pytest.approx(chunked["mean_recall"])
