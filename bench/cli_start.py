"""`lora-studio render` wall time, whole process, as a user runs it: handed to a running `lora-studio serve`, and
cold in a fresh process (`--in-process`: imports, pipeline load, render), with `python -c pass` and
`lora-studio --help` beside them for scale.

python -m bench.cli_start [--repeat 5] [--steps N] [--prompt TEXT]

A `lora-studio serve` is started on a fresh data dir (the bundled toy model) and left to warm up with one render;
then each round runs every command once, round-robin, each timed from spawn to exit.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import emit, free_port, round_robin, spread

CLI = str(Path(sys.executable).with_name("lora-studio"))


def run(args: list[str], env: dict) -> None:
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()[-500:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--prompt", default="a red star on the left, blue background")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        data, port = Path(tmp) / "data", free_port()
        render = [CLI, "render", "--prompt", args.prompt, "--data-dir", str(data), "--out", f"{tmp}/r.png"]
        render += ["--steps", str(args.steps)] if args.steps else []
        server = subprocess.Popen(
            [CLI, "serve", "--port", str(port), "--data-dir", str(data)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 300
            while not (data / "serve.json").exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("lora-studio serve did not start")
                time.sleep(0.2)
            run(render, env)  # the server's first render loads its pipeline
            times = round_robin(
                {
                    "python_c_pass": lambda: run([sys.executable, "-c", "pass"], env),
                    "cli_help": lambda: run([CLI, "--help"], env),
                    "render_handed_to_serve": lambda: run(render, env),
                    "render_in_process_cold": lambda: run([*render, "--in-process"], env),
                },
                args.repeat,
                warmup=False,
            )
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)
        shutil.rmtree(data, ignore_errors=True)
    figures: dict[str, float] = {"rounds": args.repeat}
    for name, ts in times.items():
        s = spread(ts, digits=2)
        figures.update({f"{name}_s_{q}": s[q] for q in ("min", "median", "max")})
    emit(
        "cli_start",
        figures,
        {"render_handed_to_serve_s_median": "<= 3"},
        {"steps": args.steps, "cpu_threads": os.cpu_count()},
    )


if __name__ == "__main__":
    main()
