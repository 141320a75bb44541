#!/usr/bin/env bash
# GPU throughput of issue 16 in one call: the numbers BENCHMARKS.md section 6 leaves "not measured".
#
#  1. the bf16 matmul peak (best of 2048 / 4096 / 8192, what MFU is quoted against);
#  2. ViT-L/16 (base.yaml + model.patch_size=16, 2x224 + 8x96 crops, batch 64) eager, compiled, compiled
#     with the blocks in CUDA graphs (run.compile_mode=reduce-overhead), and
#     eager with the cuDNN and flash SDPA kernels forced, `dinolike bench --synthetic` (crops on the GPU);
#  3. ViT-g/14 (vitg14_pretrain.yaml): the largest batch of BATCHES_G that fits without activation
#     checkpointing, with the MLP branches recomputed, and with whole blocks recomputed (SCOPES_G; each
#     batch its own process; the first failure ends that ladder);
#  4. the loader at 224 px on this machine's cores (benchmarks/bench_loader.py, JPEGs made in $OUT), with
#     the whole augmentation in the workers and with its photometric half on the GPU (data.augment_on_device);
#  5. ViT-L/16 fed by that loader (DATA_WORKERS workers), both ways: loader img/s, step img/s, bottleneck.
# Writes $OUT/gpu_throughput_<time>/: one JSON per bench, its log, and summary.md (the table rows).
# Budget: ~8-10 minutes on an H100/H200 (compile ~2 min, each g/14 batch ~20-40 s: with a 10-minute
# limit per call, STEPS="g" can go in a second call).
#
# On the GPU machine (no network), from the project root, after ../shared/gpu/prepare here:
#   source .gpu/env.sh && bash benchmarks/gpu_throughput.sh
# Knobs (environment): DEVICE (cuda), ITERS (10), WARMUP (3), BATCH_L (64), BATCHES_G ("16 24 32 48 64"),
# SCOPES_G ("none mlp block"),
# L_ARGS / G_ARGS (config and overrides of the two models), LOADER_WORKERS ("4 8 12"), LOADER_IMAGES (1000),
# DATA_WORKERS (12), STEPS (which of "peak l_eager l_compiled l_graphs l_sdpa g loader l_data" to run).
# A dry run on CPU (tiny models, seconds each):
#   DEVICE=cpu ITERS=1 WARMUP=1 BATCH_L=4 BATCHES_G="2 4" LOADER_WORKERS=1 LOADER_IMAGES=20 \
#   L_ARGS="--config configs/fmnist_smoke.yaml" G_ARGS="--config configs/fmnist_smoke.yaml" \
#   STEPS="peak l_eager l_compiled g loader" bash benchmarks/gpu_throughput.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
ITERS=${ITERS:-10}
WARMUP=${WARMUP:-3}
BATCH_L=${BATCH_L:-64}
BATCHES_G=${BATCHES_G:-"16 24 32 48 64"}
SCOPES_G=${SCOPES_G:-"none mlp block"}
L_ARGS=${L_ARGS:-"--config configs/base.yaml model.patch_size=16"}
G_ARGS=${G_ARGS:-"--config configs/vitg14_pretrain.yaml"}
LOADER_WORKERS=${LOADER_WORKERS:-"4 8 12"}
LOADER_IMAGES=${LOADER_IMAGES:-1000}
LOADER_SECONDS=${LOADER_SECONDS:-5}
DATA_WORKERS=${DATA_WORKERS:-12}
STEPS=${STEPS:-"peak l_eager l_compiled l_graphs l_sdpa g loader l_data"}
PY=${PYTHON:-python3}
DIR=${OUT:-/tmp}/gpu_throughput_$(date +%s)
mkdir -p "$DIR"
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$DIR/machine.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$DIR/machine.txt" 2>/dev/null
has() { [[ " $STEPS " == *" $1 "* ]]; }

# bench NAME TIMEOUT_S ARGS...: one `dinolike bench --synthetic` run -> NAME.json / NAME.log
bench() {
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$PY" -m dinolike.cli bench --synthetic --iters "$ITERS" --warmup "$WARMUP" \
        --json "$DIR/$name.json" "$@" run.device="$DEVICE" > "$DIR/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc" | tee -a "$DIR/status.txt"
    return $rc
}

if has peak; then
    "$PY" - "$DEVICE" > "$DIR/peak.txt" 2>&1 <<'PY'
import sys, torch
from dinolike.bench.device import PEAK_SIZES, peak_matmul_flops
dev = torch.device(sys.argv[1])
dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
for n in PEAK_SIZES.get(dev.type, PEAK_SIZES["cpu"]):
    flops, _ = peak_matmul_flops(dev, dtype, (n,), min_seconds=0.5)
    print(f"| matmul {n}^3 {str(dtype)[6:]} | {flops / 1e12:.3f} TFLOP/s |")
PY
    cat "$DIR/peak.txt"
fi
# shellcheck disable=SC2086  # the *_ARGS strings are word lists on purpose
{
has l_eager && bench vitl16_eager 300 $L_ARGS data.batch_size="$BATCH_L"
has l_compiled && bench vitl16_compiled 500 $L_ARGS data.batch_size="$BATCH_L" run.compile=true
has l_graphs && bench vitl16_cudagraphs 500 $L_ARGS data.batch_size="$BATCH_L" run.compile=true \
    run.compile_mode=reduce-overhead
if has l_sdpa; then
    bench vitl16_cudnn 300 $L_ARGS data.batch_size="$BATCH_L" --sdpa cudnn
    bench vitl16_flash 300 $L_ARGS data.batch_size="$BATCH_L" --sdpa flash
fi
if has g; then
    for scope in $SCOPES_G; do  # none, or what activation checkpointing recomputes: block | mlp | attn
        ac=$([[ $scope == none ]] && echo false || echo true)
        sc=$([[ $scope == none ]] && echo block || echo "$scope")
        for b in $BATCHES_G; do
            bench "vitg14_ac${scope}_b$b" 300 $G_ARGS data.batch_size="$b" dist.activation_checkpointing="$ac" \
                dist.activation_checkpointing_scope="$sc" --iters 3 --warmup 1 || break
        done
    done
fi
}
if has loader; then
    for where in false true; do  # true: the workers crop only; jitter / blur / solarize run on the GPU
        timeout 400 "$PY" benchmarks/bench_loader.py --dir "$DIR/jpegs" --images "$LOADER_IMAGES" \
            --workers $LOADER_WORKERS --seconds "$LOADER_SECONDS" data.augment_on_device=$where \
            > "$DIR/loader_ondevice_$where.md" 2>"$DIR/loader_ondevice_$where.log"
        echo "loader (augment_on_device=$where): exit $?" | tee -a "$DIR/status.txt"
        cat "$DIR/loader_ondevice_$where.md"
    done
fi
# shellcheck disable=SC2086
if has l_data; then  # ViT-L/16 fed by the real loader from the JPEGs: loader img/s vs step img/s
    [[ -d "$DIR/jpegs" ]] || "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path
from bench_loader import make_jpegs; make_jpegs(Path(sys.argv[1]), int(sys.argv[2]))" "$DIR/jpegs" "$LOADER_IMAGES"
    for where in false true; do
        timeout 300 "$PY" -m dinolike.cli bench --iters "$ITERS" --warmup "$WARMUP" \
            --json "$DIR/vitl16_data_ondevice_$where.json" $L_ARGS data.batch_size="$BATCH_L" run.device="$DEVICE" \
            data.train=folder-nolabels:"$DIR/jpegs" data.num_workers="$DATA_WORKERS" data.augment_on_device=$where \
            > "$DIR/vitl16_data_ondevice_$where.log" 2>&1
        echo "vitl16_data_ondevice_$where: exit $?" | tee -a "$DIR/status.txt"
    done
fi
rm -rf "$DIR/jpegs"

"$PY" - "$DIR" > "$DIR/summary.md" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| run | batch | img/s | step ms (phase-timed) | peak GiB | MFU | peak matmul | attention |")
print("|---|---|---|---|---|---|---|---|")
for f in sorted(out.glob("*.json")):
    r = json.loads(f.read_text())
    mem = r.get("peak_memory_gib", r.get("peak_rss_gib", 0))
    mfu = f"{100 * r['mfu']:.1f} %" if "mfu" in r else "-"
    print(f"| {f.stem} | {r['batch_size']} | {r['img_per_s']:.1f} | {r['step_ms']:.0f} | {mem:.1f} | {mfu} "
          f"| {r.get('peak_matmul', '-')} | {r['attention_kernel']} |")
PY
cat "$DIR/summary.md"
echo "outputs: $DIR"
