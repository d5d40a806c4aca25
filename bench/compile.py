"""The denoiser under torch.compile with LoRAs switching: compiled (static slots) against eager (our dynamic
layer), each timed as a switch plus the forward after it, round-robin, and the recompiles that the switches
caused (torch._dynamo's counters).

python -m bench.compile [--family sdxl|flux] [--config toy] [--k 2] [--rank 16] [--sets 4] [--repeat 10]
                        [--mode default|reduce-overhead|max-autotune] [--device cpu|cuda] [--dtype float16]

`reduce-overhead` adds CUDA graphs on a GPU. The first compiled call compiles (its time is reported apart);
every later switch must reuse the graph: `recompiles` counts the frames Dynamo compiled again, `unique_graphs`
the graphs it made in all.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time

import torch

from bench.common import (
    add_device_args,
    build_denoiser,
    denoiser_inputs,
    device_setup,
    emit,
    random_lora,
    ratio,
    round_robin,
    spread,
)
from composer.adapters.host import AdapterHost
from composer.backbones import BACKBONES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="toy")
    parser.add_argument("--k", type=int, default=2, help="LoRAs active per set")
    parser.add_argument("--sets", type=int, default=4, help="sets cycled through")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--mode", default="default")
    add_device_args(parser)
    args = parser.parse_args()
    from torch._dynamo.utils import counters

    device, dtype, sync, latent = device_setup(args)
    backbone = BACKBONES[args.family]
    eager = build_denoiser(args.family, args.config, device, dtype)
    compiled = copy.deepcopy(eager)
    targets = backbone.target_modules(eager)
    hosts = [AdapterHost({backbone.denoiser: m}, args.family) for m in (eager, compiled)]
    for i in range(args.k * args.sets):
        lora = random_lora(eager, i, args.rank, targets, backbone.denoiser, args.family)[0]
        for host in hosts:
            host.add(f"l{i}", lora)
    sets = [{f"l{args.k * s + j}": 0.6 + 0.1 * j for j in range(args.k)} for s in range(args.sets)]
    batch = 2 if args.family == "sdxl" else 1
    inputs = denoiser_inputs(eager, batch, latent, device, dtype)

    hosts[1].make_static(backbone.denoiser, args.rank * args.k)
    torch._dynamo.reset()
    counters.clear()
    compiled.compile(mode=None if args.mode == "default" else args.mode)
    with torch.inference_mode():
        hosts[1].set_active(sets[0])
        start = time.perf_counter()
        compiled(**inputs)
        sync()
        compile_s = time.perf_counter() - start
        graphs_after_compile = counters["stats"]["unique_graphs"]
        cycles = [itertools.cycle(sets) for _ in hosts]

        def switch_and_run(n: int):
            model, host, cycle = (eager, compiled)[n], hosts[n], cycles[n]
            return lambda: (host.set_active(next(cycle)), model(**inputs))

        times = round_robin(
            {
                "eager_switch_forward": switch_and_run(0),
                "compiled_switch_forward": switch_and_run(1),
                "eager_warm_forward": lambda: eager(**inputs),
                "compiled_warm_forward": lambda: compiled(**inputs),
            },
            args.repeat,
            sync,
        )
        hosts[0].set_active(sets[1])
        hosts[1].set_active(sets[1])
        diff = (compiled(**inputs)[0].float() - eager(**inputs)[0].float()).abs().max().item()
    figures: dict[str, float] = {
        "rounds": args.repeat,
        "switches": args.repeat + 2,
        "recompiles": sum(counters["recompiles"].values()),
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graphs_made_after_the_first_call": counters["stats"]["unique_graphs"] - graphs_after_compile,
        "max_abs_diff_vs_eager": float(f"{diff:.3g}"),
        "first_call_compile_s": round(compile_s, 1),
    }
    figures.update(
        ratio(times, "compiled_switch_forward", "eager_switch_forward", "compiled_over_eager_switch")
    )
    figures.update(ratio(times, "compiled_warm_forward", "eager_warm_forward", "compiled_over_eager_warm"))
    if device.startswith("cuda"):
        for name, ts in times.items():
            ms = spread(ts, 1e3, 2)
            figures.update({f"{name}_ms_{q}": ms[q] for q in ("min", "median", "max")})
    emit(
        "compile",
        figures,
        {"recompiles": "== 0", "graphs_made_after_the_first_call": "== 0"},
        {
            "family": args.family,
            "config": args.config,
            "mode": args.mode,
            "k": args.k,
            "rank": args.rank,
            "slot_rank": args.rank * args.k,
            "batch": batch,
            "latent": latent,
            "threads": torch.get_num_threads(),
        },
    )


if __name__ == "__main__":
    main()
