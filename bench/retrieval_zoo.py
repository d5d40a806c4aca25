"""Train the toy model's LoRA retriever on the zoo and measure held-out retrieval (issue 21).

OMP_NUM_THREADS=2 python -m bench.retrieval_zoo --zoo zoo [--steps 600] [--save toyworld/model/lora_encoder]

The zoo (`python -m toyworld.zoo --out zoo`) holds a few hundred small adapters of toy-world looks; one pair
concept in five is held out. The retriever (weight encoder + text head, `retrieval.model`) trains
contrastively on the rest, each LoRA against plain descriptions of its look ("red star", "a red star", ...).
Then each held-out LoRA's description is a query:
- weights: the query's text embedding against the LoRAs' weight embeddings (no metadata at all);
- text: the catalog's full-text search (`db.search`, bm25) over the metadata a LoRA file brings, in two
  cases: thin (its trigger word and generic tags, named after the trigger word, as most files arrive) and
  descriptive (named after its look, e.g. "zoo-red-star");
- hybrid: the two rankings fused (reciprocal rank, `retrieval.train.reciprocal_rank_fusion`);
- random: the expected figures of a random ranking.
Candidates are the held-out LoRAs (a query's answer is never a LoRA the encoder trained on), and then the whole
zoo (harder: every trained LoRA is a distractor).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from composer.adapters.host import AdapterHost
from composer.backbones import get_backbone, load_pipeline
from composer.formats import read_lora
from composer.train import TrainConfig
from composer.train.targets import target_keys
from retrieval.encoder import adapter_deltas, module_shapes
from retrieval.model import LoraRetriever
from retrieval.text import text_features
from retrieval.train import Example, fit, random_baseline, ranking_measures, reciprocal_rank_fusion
from toyworld import model_dir

TEMPLATES = ("{}", "a {}", "{} lora", "a picture of {}", "{} look", "{} style")


def zoo_entries(zoo: Path) -> list[dict]:
    """Every zoo adapter (twins last: `twin_of` names the concept's first adapter)."""
    entries = [json.loads(line) for p in sorted(zoo.glob("zoo-*.jsonl")) for line in p.open()]
    if not entries:
        raise SystemExit(f"{zoo}: no zoo-*.jsonl; make the zoo first (python -m toyworld.zoo --out {zoo})")
    return sorted(entries, key=lambda e: (e.get("twin_of") is not None, e["name"]))


def adaptable_shapes(pipe, backbone, host) -> dict:
    """Every module a LoRA of this base model may adapt (denoiser, all layers, and the text encoders)."""
    keys = target_keys(backbone, pipe, TrainConfig(prompt="x", targets="full", text_encoder=True))
    return module_shapes(host, keys)


def load_deltas(pipe, backbone, host, zoo: Path, entries: list[dict]) -> list[dict]:
    cache = zoo / "deltas.pt"
    if cache.is_file():
        stored = torch.load(cache)
        if stored["names"] == [e["name"] for e in entries]:
            return [{k: v.float() for k, v in d.items()} for d in stored["deltas"]]
    out = []
    for entry in entries:
        host.add("zoo", read_lora(zoo / entry["file"]))
        try:
            out.append(adapter_deltas(host, "zoo"))
        finally:
            host.remove("zoo")
    torch.save(
        {"names": [e["name"] for e in entries], "deltas": [{k: v.half() for k, v in d.items()} for d in out]},
        cache,
    )
    return out


def text_ranking(entries: list[dict], queries: list[str], descriptive: bool) -> list[list[int]]:
    """Each query's full-text ranking (entry indices) over the entries' metadata, through the catalog's own
    search (a scratch SQLite catalog)."""
    from db.repository import AdapterRepository
    from db.session import make_engine, make_session_factory, unit_of_work, upgrade

    engine = make_engine("sqlite://")
    upgrade(engine)
    sessions = make_session_factory(engine)
    with unit_of_work(sessions) as session:
        repo = AdapterRepository(session)
        for i, e in enumerate(entries):
            digest = f"{i:064x}"
            repo.add(
                name=e["name"] if descriptive else f"lora-{e['trigger']}",
                family="sdxl",
                adapter_type=e["kind"],
                source_format="kohya",
                file_path=f"/zoo/{e['file']}",
                file_size=1,
                sha256=digest,
                tensor_sha256=digest,
                trigger_words=[e["trigger"]],
                tags=["toyworld", "zoo"],
            )
        names = {(e["name"] if descriptive else f"lora-{e['trigger']}"): i for i, e in enumerate(entries)}
        rankings = []
        for query in queries:
            rows = repo.search(query, limit=len(entries))
            rankings.append([names[a.name] for a, _ in rows])
    engine.dispose()
    return rankings


def scores_from_rankings(rankings: list[list[int]], candidates: int) -> np.ndarray:
    """Rankings as scores (unranked candidates tie last)."""
    scores = np.zeros((len(rankings), candidates))
    for q, ranking in enumerate(rankings):
        for rank, item in enumerate(ranking):
            scores[q, item] = candidates - rank
    return scores


def measure(model, pipe, entries, deltas, candidates: list[int]) -> dict:
    held = [i for i, e in enumerate(entries) if e["held_out"] and not e.get("twin_of")]
    queries = [entries[i]["description"] for i in held]
    truth = [candidates.index(i) for i in held]  # held-out LoRAs are among the candidates in both cases
    began = time.perf_counter()
    embeddings = np.concatenate(
        [
            model.encoder.embed_batch(
                [model.known(deltas[i]) for i in candidates[start : start + 32]]
            ).numpy()
            for start in range(0, len(candidates), 32)
        ]
    )
    seconds = (time.perf_counter() - began) / len(candidates)
    one = time.perf_counter()
    model.encoder(model.known(deltas[candidates[0]]))
    one = time.perf_counter() - one
    query_vecs = model.embed_texts(pipe, queries)
    weight_scores = query_vecs @ embeddings.T
    out = {
        "weights": ranking_measures(weight_scores, truth),
        "encode_ms_per_lora_batched": round(1000 * seconds, 1),
        "encode_ms_one_lora": round(1000 * one, 1),
    }
    weight_rank = [list(np.argsort(-row, kind="stable")) for row in weight_scores]
    sub = [entries[i] for i in candidates]
    for case, descriptive in (("thin", False), ("descriptive", True)):
        text = text_ranking(sub, queries, descriptive)
        out[f"text_{case}"] = ranking_measures(scores_from_rankings(text, len(candidates)), truth)
        fused = [reciprocal_rank_fusion([w, t]) for w, t in zip(weight_rank, text, strict=True)]
        hybrid = np.array([[f.get(c, 0.0) for c in range(len(candidates))] for f in fused])
        out[f"hybrid_{case}"] = ranking_measures(hybrid, truth)
    out["random"] = random_baseline(len(queries), len(candidates))
    return out


NONSENSE = (
    "nothing-like-this", "qwzx", "invoice total due", "a photograph of my tax return", "lorem ipsum dolor",
    "asdfgh", "the quarterly report", "12345", "zzzz yyyy", "a sonnet about spreadsheets",
)  # fmt: skip


def match_cosines(model, pipe, entries, deltas) -> dict:
    """What a weight match scores: the cosine of each held-out description with its own LoRA, against the best
    cosine any nonsense query reaches over the whole zoo (a floor for search results would have to sit
    between); and the same standardised per query (cosine minus the query's mean over the zoo, over its spread)."""
    held = [i for i, e in enumerate(entries) if e["held_out"] and not e.get("twin_of")]
    vectors = embed_all(model, deltas, list(range(len(entries))))
    queries = model.embed_texts(pipe, [entries[i]["description"] for i in held])
    nonsense = model.embed_texts(pipe, list(NONSENSE))
    mean, cov = vectors.mean(axis=0), np.cov(vectors.T)

    def standardised(q: np.ndarray) -> np.ndarray:
        spread = np.sqrt(np.einsum("ij,jk,ik->i", q, cov, q))
        return (q @ vectors.T - (q @ mean)[:, None]) / spread[:, None]

    rows = np.arange(len(held))
    right, right_z = (queries @ vectors.T)[rows, held], standardised(queries)[rows, held]
    wrong, wrong_z = (nonsense @ vectors.T).max(axis=1), standardised(nonsense).max(axis=1)

    def spread(x: np.ndarray, high: bool) -> dict:
        key, value = ("max", x.max()) if high else ("p10", np.percentile(x, 10))
        return {key: round(float(value), 3), "median": round(float(np.median(x)), 3)}

    return {
        "true_match_cosine": spread(right, False),
        "nonsense_best_cosine": spread(wrong, True),
        "true_match_z": spread(right_z, False),
        "nonsense_best_z": spread(wrong_z, True),
    }


def embed_all(model, deltas, which: list[int]) -> np.ndarray:
    return np.concatenate(
        [
            model.encoder.embed_batch([model.known(deltas[i]) for i in which[start : start + 32]]).numpy()
            for start in range(0, len(which), 32)
        ]
    )


def near_duplicates(model, entries, deltas) -> dict:
    """Twins (one concept trained twice: another type, rank, trigger word and images) against every other pair
    of the zoo: how many twin pairs reach a cosine threshold, and how many other pairs do too."""
    twins = [
        (i, next(j for j, o in enumerate(entries) if o["name"] == e["twin_of"]))
        for i, e in enumerate(entries)
        if e.get("twin_of")
    ]
    if not twins:
        return {"twins": 0}
    vectors = embed_all(model, deltas, list(range(len(entries))))
    sims = vectors @ vectors.T
    positive = {tuple(sorted(p)) for p in twins}
    upper = np.triu_indices(len(entries), k=1)
    out = {"twins": len(twins), "other_pairs": len(upper[0]) - len(positive)}
    twin_sims = [sims[a, b] for a, b in positive]
    out["twin_cosine"] = {
        "min": round(float(min(twin_sims)), 3),
        "median": round(float(np.median(twin_sims)), 3),
    }
    for t in (0.8, 0.85, 0.9, 0.95, 0.97, 0.99):
        found = sum(s >= t for s in twin_sims)
        found = int(found)
        false = int((sims[upper] >= t).sum()) - found
        out[f"at_{t}"] = {"twins_found": int(found), "other_pairs_flagged": false}
    return out


def bundled(model, pipe, host) -> dict:
    """The bundled concept LoRAs (another recipe: 1600 steps, trigger words in two-object scenes, text encoders
    adapted), never seen by the encoder: each concept's plain description against the 12 of them."""
    from toyworld import loras_dir
    from toyworld.zoo import describe

    manifest = json.loads((loras_dir() / "manifest.json").read_text())["adapters"]
    kinds = {"subject": "shape", "style": "texture", "background": "background"}
    chosen = [a for a in manifest if a["kind"] == "lora" and a["tags"][-1] in kinds]
    vectors = []
    for a in chosen:
        host.add("bundled", read_lora(loras_dir() / a["file"]))
        try:
            vectors.append(model.embed_adapter(host, "bundled"))
        finally:
            host.remove("bundled")
    queries = [describe({kinds[a["tags"][-1]]: a["name"]}) for a in chosen]
    scores = model.embed_texts(pipe, queries) @ np.stack(vectors).T
    return {
        "queries": queries,
        **ranking_measures(scores, list(range(len(chosen)))),
        "random": random_baseline(len(chosen), len(chosen)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zoo", type=Path, default=Path("zoo"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument(
        "--module-dropout", type=float, default=0.0, help="share of a LoRA's modules hidden per step"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, default=None, help="write the trained retriever here")
    parser.add_argument(
        "--load", type=Path, default=None, help="measure this trained retriever instead of training one"
    )
    args = parser.parse_args()
    backbone = get_backbone("sdxl")
    pipe = load_pipeline(backbone, str(model_dir()))
    host = AdapterHost.for_pipeline(pipe, backbone)
    entries = zoo_entries(args.zoo)
    deltas = load_deltas(pipe, backbone, host, args.zoo, entries)
    train = [i for i, e in enumerate(entries) if not e["held_out"] and not e.get("twin_of")]
    if args.load:
        model = LoraRetriever.load(args.load)
        record = model.record
    else:
        model = LoraRetriever.for_pipeline(pipe, adaptable_shapes(pipe, backbone, host), seed=args.seed)
        examples = [
            Example(model.known(deltas[i]), [t.format(entries[i]["description"]) for t in TEMPLATES])
            for i in train
        ]
        texts = sorted({t for e in examples for t in e.texts})
        features = dict(zip(texts, text_features(pipe, texts), strict=True))
        record = fit(
            model,
            examples,
            features,
            args.steps,
            args.batch,
            args.lr,
            args.seed,
            args.weight_decay,
            args.module_dropout,
        )
        if args.save:  # kept before measuring; saved again below with the measurements in its record
            model.record = record
            model.save(args.save)
    held = [i for i, e in enumerate(entries) if e["held_out"] and not e.get("twin_of")]
    singles = [i for i, e in enumerate(entries) if not e.get("twin_of")]
    with torch.no_grad():
        result = {
            "zoo": len(singles),
            "twins": len(entries) - len(singles),
            "trained_on": len(train),
            "held_out": len(held),
            "training": record,
            "held_out_candidates": measure(model, pipe, entries, deltas, held),
            "whole_zoo_candidates": measure(model, pipe, entries, deltas, singles),
            "match_cosines": match_cosines(model, pipe, entries, deltas),
            "near_duplicates": near_duplicates(model, entries, deltas),
            "bundled_loras": bundled(model, pipe, host),
        }
    print(json.dumps(result, indent=1))
    if args.save:
        model.record = {
            **{k: v for k, v in record.items() if k not in ("zoo", "held_out", "measured")},
            "zoo": len(entries),
            "held_out": len(held),
            "measured": result["held_out_candidates"],
        }
        model.save(args.save)


if __name__ == "__main__":
    main()
