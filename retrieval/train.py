"""Contrastive training of a `LoraRetriever` (CLIP-style, symmetric InfoNCE) and the retrieval measures.

Each training example is one LoRA (its dense deltas, {module: (out, in)}) and texts that describe it; each step
draws a batch of LoRAs, one of each one's texts, and pulls matching pairs together against the others in the
batch. Base model, text encoders and LoRAs stay frozen: only the weight encoder, the text head and the
temperature learn. Deltas are multiplied by a random strength per example (0.25 to 4): the encoder is built to
ignore strength, and this checks that it keeps doing so as it learns.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.model import LoraRetriever


@dataclass
class Example:
    deltas: dict  # module key -> dense delta (out, in)
    texts: list[str]  # descriptions; one is drawn per step


def fit(
    model: LoraRetriever,
    examples: Sequence[Example],
    text_features: dict[str, torch.Tensor],
    steps: int = 600,
    batch: int = 48,
    lr: float = 1e-3,
    seed: int = 0,
    weight_decay: float = 1e-4,
    module_dropout: float = 0.0,
    log_every: int = 100,
    log=print,
) -> dict:
    """Train `model` in place; returns the training record (steps, seconds, first and last loss).

    `text_features`: every text of the examples -> its frozen features (`retrieval.text.text_features`).
    `module_dropout`: the share of each example's modules left out at random per step (at least one kept), so
    the embedding cannot hang on which modules a LoRA adapts.
    """
    if len(examples) < 2:
        raise ValueError(f"contrastive training needs at least 2 LoRAs, got {len(examples)}")
    missing = {t for e in examples for t in e.texts} - set(text_features)
    if missing:
        raise ValueError(f"no text features for {sorted(missing)[:3]}")
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses: list[float] = []
    began = time.perf_counter()
    batch = min(batch, len(examples))
    for step in range(steps):
        chosen = rng.choice(len(examples), size=batch, replace=False)
        strengths = torch.exp(torch.empty(batch).uniform_(np.log(0.25), np.log(4.0), generator=generator))
        weights = model.encoder.embed_batch(
            [
                {k: v * s for k, v in _kept(examples[i].deltas, module_dropout, rng).items()}
                for i, s in zip(chosen, strengths, strict=True)
            ]
        )
        texts = [examples[i].texts[rng.integers(len(examples[i].texts))] for i in chosen]
        text = model.text(torch.stack([text_features[t] for t in texts]))
        # LoRAs that share a description (the same concept twice) are not each other's negatives
        same = torch.tensor([[a == b for b in texts] for a in texts])
        logits = model.logit_scale.exp().clamp(max=100) * weights @ text.T
        logits = logits.masked_fill(same & ~torch.eye(batch, dtype=torch.bool), -1e4)
        target = torch.arange(batch)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            log(f"step {step + 1}/{steps}: loss {np.mean(losses[-log_every:]):.3f}")
    model.eval()
    return {
        "steps": steps,
        "batch": batch,
        "learning_rate": lr,
        "weight_decay": weight_decay,
        "module_dropout": module_dropout,
        "examples": len(examples),
        "seconds": round(time.perf_counter() - began, 1),
        "loss_first": round(float(np.mean(losses[: max(1, steps // 20)])), 4),
        "loss_last": round(float(np.mean(losses[-max(1, steps // 20) :])), 4),
    }


def _kept(deltas: dict, dropout: float, rng: np.random.Generator) -> dict:
    """`deltas` less a random share `dropout` of its modules (at least one kept)."""
    if dropout <= 0 or len(deltas) < 2:
        return deltas
    keys = list(deltas)
    keep = rng.random(len(keys)) >= dropout
    keep[rng.integers(len(keys))] = True
    return {k: deltas[k] for k, kept in zip(keys, keep, strict=True) if kept}


def ranking_measures(scores: np.ndarray, truth: Sequence[int]) -> dict:
    """Recall@1, Recall@5 and MRR of queries (rows of `scores`, higher is better) whose right answer is column
    `truth[i]`; ties count against the query (the right answer ranks after every equal score)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != len(truth):
        raise ValueError(f"scores of shape {scores.shape} for {len(truth)} queries")
    right = scores[np.arange(len(truth)), list(truth)]
    ranks = (scores >= right[:, None]).sum(axis=1)  # 1 = first
    return {
        "queries": len(truth),
        "candidates": scores.shape[1],
        "recall@1": round(float(np.mean(ranks <= 1)), 3),
        "recall@5": round(float(np.mean(ranks <= 5)), 3),
        "mrr": round(float(np.mean(1.0 / ranks)), 3),
    }


def random_baseline(queries: int, candidates: int) -> dict:
    """What ranking at random scores in expectation: R@k = k / candidates, MRR = H(candidates) / candidates."""
    harmonic = float(np.sum(1.0 / np.arange(1, candidates + 1)))
    return {
        "queries": queries,
        "candidates": candidates,
        "recall@1": round(1 / candidates, 3),
        "recall@5": round(min(5, candidates) / candidates, 3),
        "mrr": round(harmonic / candidates, 3),
    }


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = 60) -> dict[int, float]:
    """Hybrid ranking: each id scores the sum of 1 / (k + rank) over the rankings that hold it (rank from 1)."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return fused
