"""Render a prompt set with fixed seeds and score it with the toy-world evaluator.

python -m bench.quality [--model toyworld/model] [--set withheld|held_out_subjects] [--n 48] [--per-prompt 2]
                        [--steps 30] [--guidance 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.common import emit  # noqa: E402
from composer.backbones import get_backbone, load_pipeline  # noqa: E402
from toyworld import quality  # noqa: E402
from toyworld.evaluator import Evaluator  # noqa: E402

GOALS = {
    "withheld": {"shape": ">= 0.9", "colour": ">= 0.9", "position": ">= 0.85"},
    "held_out_subjects": {"shape_drawn": "<= 0.2"},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="toyworld/model")
    parser.add_argument("--set", default="withheld", choices=quality.PROMPT_SETS)
    parser.add_argument("--n", type=int, default=48, help="prompts (a fixed sample of the set)")
    parser.add_argument("--per-prompt", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = load_pipeline(get_backbone("sdxl"), args.model)
    specs = quality.prompt_set(args.set, args.n, args.seed)
    start = time.perf_counter()
    run = quality.generate(pipe, specs, args.per_prompt, args.steps, args.guidance, args.seed)
    seconds = time.perf_counter() - start
    figures = quality.measure(Evaluator.load(), run)
    emit(
        "quality",
        figures,
        GOALS[args.set],
        {
            "set": args.set,
            "images": len(run.images),
            "steps": args.steps,
            "guidance": args.guidance,
            "render_seconds": round(seconds, 1),
        },
    )


if __name__ == "__main__":
    main()
