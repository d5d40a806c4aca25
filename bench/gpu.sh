#!/usr/bin/env bash
# The GPU figures of docs/BENCHMARKS.md in one command, on the real SDXL and FLUX.1-dev architectures with
# random weights (they cost the same time as trained ones) at 1024x1024: SDXL in fp16 (latent 128, batch 2 =
# classifier-free guidance), FLUX in bf16 (4096 image tokens, 512 text tokens, batch 1, guidance embedded).
#
#   bash bench/gpu.sh [LOG_DIR]        # each benchmark's JSON also goes to LOG_DIR (default bench-gpu-logs)
#   ONLY=sdxl bash bench/gpu.sh        # or ONLY=flux
#   DEVICE=cpu CONFIG=tiny bash bench/gpu.sh /tmp/logs   # the same script on tiny models: a smoke test (minutes)
#
# The FLUX lines hold two or three copies of the 12 B transformer (ours, diffusers', a fresh one): about 72 GB
# in bf16, so they want an 80 GB card with little else on it, or an H200.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
LOGS="${1:-bench-gpu-logs}"
mkdir -p "$LOGS"
export HF_HUB_OFFLINE=1
DEVICE="${DEVICE:-cuda}"
CONFIG="${CONFIG:-real}"
if [ "$DEVICE" = cuda ]; then HALF=float16 BF=bfloat16 LATENT=128; else HALF=float32 BF=float32 LATENT=16; fi

run() {  # run NAME ARGS...: the benchmark's output to the terminal, its JSON line to LOGS/NAME.json
    local name="$1"
    shift
    echo "== $name: python -m $*"
    "$PY" -m "$@" | tee "$LOGS/$name.out"
    tail -n 1 "$LOGS/$name.out" >"$LOGS/$name.json"
}

if [ "${ONLY:-sdxl}" = sdxl ]; then
    run sdxl_overhead bench.overhead --family sdxl --configs "$CONFIG" --device "$DEVICE" --dtype $HALF --repeat 20
    run sdxl_switch bench.switch --family sdxl --config "$CONFIG" --device "$DEVICE" --dtype $HALF --repeat 21 \
        --ks 1,2,4,8 --sets 2,6
    run sdxl_compile bench.compile --family sdxl --config "$CONFIG" --device "$DEVICE" --dtype $HALF \
        --mode "$([ "$DEVICE" = cuda ] && echo reduce-overhead || echo default)" --k 2 --repeat 20
    run sdxl_methods bench.method_steps --family sdxl --config "$CONFIG" --device "$DEVICE" --dtype $HALF \
        --k 3 --repeat 10
    run sdxl_train bench.train_speed --config "$CONFIG" --device "$DEVICE" --latent $LATENT --repeat 20
fi
if [ "${ONLY:-flux}" = flux ]; then
    run flux_overhead bench.overhead --family flux --configs "$CONFIG" --device "$DEVICE" --dtype $BF --repeat 10 \
        --ks 1,2,4,8
    run flux_switch bench.switch --family flux --config "$CONFIG" --device "$DEVICE" --dtype $BF --repeat 11
    run flux_compile bench.compile --family flux --config "$CONFIG" --device "$DEVICE" --dtype $BF \
        --mode "$([ "$DEVICE" = cuda ] && echo reduce-overhead || echo default)" --k 2 --repeat 10
    run flux_methods bench.method_steps --family flux --config "$CONFIG" --device "$DEVICE" --dtype $BF \
        --k 3 --repeat 5
fi

# ms/step of the base denoiser beside the floor this studio is measured against (docs/BENCHMARKS.md).
"$PY" - "$LOGS" "$CONFIG" <<'EOF'
import json, pathlib, sys

logs, config = pathlib.Path(sys.argv[1]), sys.argv[2]
floors = {
    "sdxl": (f"{config}_r16_k1_base_ms_per_step_median", 13.7 if config == "real" else None),
    "flux": (f"flux_{config}_r16_k1_base_ms_per_step_median", None),
}
for family, (key, floor) in floors.items():
    path = logs / f"{family}_overhead.json"
    if not path.exists():
        continue
    figures = json.loads(path.read_text())["figures"]
    base = figures.get(key)
    if base is None:
        against = "(absolute times are printed on a GPU only)"
    else:
        against = f"(floor {floor} ms/step)" if floor else "(no floor recorded yet: this run sets it)"
    print(f"{family}: base denoiser {base} ms/step {against}; k=4 ours/base "
          f"{figures.get(key.replace('k1_base_ms_per_step_median', 'k4_ours_over_base'))}")
EOF
