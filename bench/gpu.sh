#!/usr/bin/env bash
# The GPU figures of docs/BENCHMARKS.md in one command, on the real SDXL architecture with random fp16 weights
# at 1024x1024 (latent 128, batch 2 = classifier-free guidance):   bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m bench.switch --config real --device cuda --dtype float16 --repeat 51
"$PY" -m bench.overhead --configs real --device cuda --dtype float16 --repeat 20
"$PY" -m bench.train_speed --config real --device cuda --latent 128 --repeat 20
