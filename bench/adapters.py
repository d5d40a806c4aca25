"""Train each adapter type on one held-out concept of the toy world and measure how often it is drawn.

python -m bench.adapters [--concept star] [--kinds lora,blora,kron,tensor] [--images 16] [--steps 400]
                         [--n 24] [--per-prompt 1] [--pairs 0.5]

For every kind: train with our Trainer on the toy model from `--images` generated scenes of the concept
(trigger-word captions), render `--n` fresh trigger prompts, and score them with the toy-world evaluator.
The base model's rate on the same prompts (no adapter) is the baseline. Prints one JSON line per kind.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.common import emit  # noqa: E402
from composer.adapters.host import AdapterHost  # noqa: E402
from composer.backbones import get_backbone, load_pipeline  # noqa: E402
from composer.train import TrainConfig  # noqa: E402
from toyworld import concepts, model_dir  # noqa: E402
from toyworld.evaluator import Evaluator  # noqa: E402

RECIPES = {  # toy-model settings per kind: a few hundred steps at batch 8 on a CPU
    "lora": dict(rank=4, learning_rate=2e-3),
    "blora": dict(rank=8, learning_rate=2e-3),
    "kron": dict(kron_factors=(4, 8), learning_rate=2e-3),
    "tensor": dict(tensor_rank=2, transform_rank=1, learning_rate=5e-3),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(model_dir()))
    parser.add_argument("--concept", default="star")
    parser.add_argument("--kinds", default="lora,blora,kron,tensor")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n", type=int, default=24, help="test prompts")
    parser.add_argument("--per-prompt", type=int, default=1)
    parser.add_argument("--sample-steps", type=int, default=30)
    parser.add_argument(
        "--guidance", default="7.5", help="render guidance; a comma list measures each (success at the first)"
    )
    parser.add_argument("--lr", type=float, default=None, help="override the recipes' learning rate")
    parser.add_argument("--rank", type=int, default=None, help="override the LoRA/B-LoRA rank")
    parser.add_argument("--kron", default=None, help="override the Kronecker factors, A1xA2")
    parser.add_argument("--tensor-rank", type=int, default=None, help="override TLoRA's residual ring rank")
    parser.add_argument(
        "--transform-rank", type=int, default=None, help="override TLoRA's transform ring rank"
    )
    parser.add_argument("--targets", default="attention", choices=["attention", "transformer", "full"])
    parser.add_argument("--text-encoder", action="store_true", help="adapt the text encoders too")
    parser.add_argument("--snr-gamma", type=float, default=None, help="Min-SNR-gamma loss weighting")
    parser.add_argument(
        "--pairs", type=float, default=0.0, help="share of training scenes with a second (base) object"
    )
    args = parser.parse_args()
    for recipe in RECIPES.values():
        if args.lr is not None:
            recipe["learning_rate"] = args.lr
        if args.rank is not None and "rank" in recipe:
            recipe["rank"] = args.rank
        if args.kron is not None and "kron_factors" in recipe:
            recipe["kron_factors"] = tuple(int(f) for f in args.kron.lower().split("x"))
        for key in ("tensor_rank", "transform_rank"):
            if getattr(args, key) is not None and key in recipe:
                recipe[key] = getattr(args, key)
    backbone = get_backbone("sdxl")
    pipe = load_pipeline(backbone, args.model)
    evaluator = Evaluator.load()
    guidances = [float(g) for g in args.guidance.split(",")]

    def measure(guidance: float) -> dict:
        return concepts.success(
            pipe, args.concept, evaluator, args.n, args.sample_steps, guidance, per_prompt=args.per_prompt
        )

    base = measure(guidances[0])
    data = concepts.training_images(args.concept, args.images, pairs=args.pairs)
    for kind in args.kinds.split(","):
        config = TrainConfig(
            kind=kind,
            prompt=data[0].caption,
            steps=args.steps,
            batch_size=args.batch,
            checkpoint_every=args.steps,
            targets=args.targets if kind != "blora" else "attention",
            snr_gamma=args.snr_gamma,
            text_encoder=args.text_encoder and kind != "blora",
            **RECIPES[kind],
        )
        result, seconds = concepts.train_in_scratch(pipe, backbone, config, data)
        host = AdapterHost.for_pipeline(pipe, backbone)
        try:
            host.add(kind, result.lora)
            with host.activate({kind: 1.0}), torch.no_grad():
                rates = {g: measure(g) for g in guidances}
            first = rates[guidances[0]]
        finally:
            host.detach()
        emit(
            "adapters",
            {"success": first["rate"], "base_success": base["rate"]},
            {"success": ">= 0.85"},
            {
                "concept": args.concept,
                "kind": kind,
                "parameters": result.parameters,
                "train_seconds": round(seconds, 1),
                "steps": args.steps,
                "batch": args.batch,
                "images": args.images,
                "prompts": args.n,
                "renders": args.n * args.per_prompt,
                "success_se": first["se"],
                "pairs": args.pairs,
                "targets": args.targets if kind != "blora" else "attention",
                "success_by_guidance": {str(g): r["rate"] for g, r in rates.items()},
                "success_by_size": first["by_size"],
                "snr_gamma": args.snr_gamma,
                "text_encoder": args.text_encoder and kind != "blora",
                "final_loss": round(sum(result.losses[-20:]) / min(20, len(result.losses)), 4),
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in RECIPES[kind].items()},
            },
        )


if __name__ == "__main__":
    main()
