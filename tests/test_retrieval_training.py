"""The retriever's training and measures (issue 21): the zoo's recipe, ranking measures against hand-computed
values, reciprocal rank fusion, contrastive training that learns to match LoRAs with their descriptions, and
the retriever folder's round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrieval.model import LoraRetriever, find
from retrieval.train import Example, fit, random_baseline, ranking_measures, reciprocal_rank_fusion
from toyworld import zoo


def test_zoo_plan_is_fixed_mixed_and_holds_out_pairs_only():
    plan = zoo.plan(300)
    assert [e.name for e in plan] == [e.name for e in zoo.plan(300)]  # the same zoo every time
    assert len({e.name for e in plan}) == 300 and len({e.trigger for e in plan}) == 300
    held = [e for e in plan if e.held_out]
    assert 0.1 < len(held) / 300 < 0.25 and all(len(e.pins) == 2 for e in held)
    assert {e.kind for e in plan} == {"lora", "kron", "tensor"} and {e.rank for e in plan} >= {2, 4, 8}
    # every attribute of a held-out pair is seen in training, in a single or another pair
    trained = {(a, v) for e in plan if not e.held_out for a, v in e.pins.items()}
    assert all((a, v) in trained for e in held for a, v in e.pins.items())
    assert zoo.plan(240) == plan[:240]
    twins = zoo.twins(4)
    assert all(t.name.endswith("-twin") and t.held_out for t in twins)
    originals = {e.name: e for e in held}
    assert all((t.kind, t.rank, t.targets) != (originals[t.name[:-5]].kind, originals[t.name[:-5]].rank, originals[t.name[:-5]].targets) for t in twins)  # fmt: skip


def test_zoo_descriptions_and_captions():
    assert zoo.describe({"shape": "star", "colour": "red"}) == "red star"
    assert zoo.describe({"texture": "zigzag"}) == "zigzag texture"
    assert zoo.describe({"colour": "blue"}) == "blue colour"
    assert zoo.describe({"background": "brick", "texture": "dotted"}) == "dotted texture, brick background"
    entry = zoo.ZooEntry(
        "x", {"shape": "star", "colour": "red"}, "zorpa", "lora", 4, "attention", 1e-3, False
    )
    for seed in range(6):
        spec = zoo.scene_for(entry, seed)
        assert spec.objects[0].shape == "star" and spec.objects[0].colour == "red"
        caption = zoo.caption_for(entry, spec)
        assert caption.startswith(f"{entry.trigger}, ") and "star" not in caption and "red" not in caption
        assert spec.background in caption  # what is not pinned stays in plain words
    data = zoo.training_data(entry, 3)
    assert len(data) == 3 and tuple(data[0].pixels.shape) == (3, 64, 64)
    assert all(d.caption.startswith("zorpa, ") for d in data)


def test_ranking_measures_and_baselines():
    scores = np.array([[0.9, 0.1, 0.2], [0.5, 0.4, 0.6], [0.3, 0.3, 0.1]])
    m = ranking_measures(scores, [0, 1, 1])  # ranks 1, 3, 2 (a tie counts against the query)
    assert m["recall@1"] == round(1 / 3, 3) and m["recall@5"] == 1.0
    assert m["mrr"] == round((1 + 1 / 3 + 1 / 2) / 3, 3)
    r = random_baseline(10, 40)
    assert r["recall@1"] == 0.025 and r["recall@5"] == 0.125
    assert r["mrr"] == round(sum(1 / k for k in range(1, 41)) / 40, 3)
    with pytest.raises(ValueError, match="scores of shape"):
        ranking_measures(scores, [0])
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1]])
    assert max(fused, key=fused.get) == 1 and fused[3] > fused[2]  # in both lists beats one list


def test_contrastive_training_matches_loras_with_their_words(tmp_path):
    """Synthetic LoRAs: each word writes its own output direction in one module; a LoRA of two words writes
    both. After training, each held-out pair of seen words is found by its description."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    shapes = {"unet.a": (16, 12), "unet.b": (8, 12)}
    words = ["red", "blue", "green", "star", "ring", "heart"]
    direction = {w: torch.randn(16, generator=g) for w in words}

    def lora(ws):
        d = sum(torch.outer(direction[w], torch.randn(12, generator=g)) for w in ws)
        return {"unet.a": d, "unet.b": torch.randn(8, 12, generator=g) * 0.01}

    pairs = [(c, s) for c in words[:3] for s in words[3:]]
    held = [("red", "ring"), ("blue", "heart")]
    train = [Example(lora(p), [" ".join(p), f"a {' '.join(p)}"]) for p in pairs if p not in held]
    train += [Example(lora([w]), [w]) for w in words]
    texts = sorted({t for e in train for t in e.texts} | {" ".join(p) for p in held})
    features = {t: _bag(t, words) for t in texts}
    model = LoraRetriever(shapes, features=len(words) + 1, width=32, probes=8)
    record = fit(model, train, features, steps=150, batch=len(train), lr=3e-3, log_every=0)
    assert record["loss_last"] < record["loss_first"] * 0.5
    held_deltas = [lora(p) for p in held]
    with torch.no_grad():
        loras = model.encoder.embed_batch(held_deltas)
        queries = model.text(torch.stack([features[" ".join(p)] for p in held]))
    assert ranking_measures((queries @ loras.T).numpy(), [0, 1])["recall@1"] == 1.0
    # the folder round trip: the same embeddings from the loaded copy
    model.record = record
    model.save(tmp_path / "lora_encoder")
    loaded = find(tmp_path)
    with torch.no_grad():
        again = loaded.encoder.embed_batch(held_deltas)
    assert loaded.record["steps"] == 150 and torch.allclose(again, loras, atol=1e-6)
    assert find(tmp_path / "nowhere") is None
    (tmp_path / "lora_encoder" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="format"):
        find(tmp_path)


def _bag(text: str, words: list[str]) -> torch.Tensor:
    v = torch.zeros(len(words) + 1)
    for w in text.split():
        v[words.index(w) if w in words else -1] += 1
    return v


def test_module_dropout_hides_a_share_of_modules_and_keeps_one():
    from retrieval.train import _kept

    deltas = {f"m{i}": i for i in range(200)}
    rng = np.random.default_rng(0)
    assert _kept(deltas, 0.0, rng) is deltas
    kept = _kept(deltas, 0.3, rng)
    assert set(kept) < set(deltas) and 0.6 < len(kept) / len(deltas) < 0.8
    assert all(kept[k] == deltas[k] for k in kept)
    assert all(len(_kept({"a": 1, "b": 2}, 0.99, rng)) >= 1 for _ in range(50))
