#!/usr/bin/env bash
# The default recipe on one GPU: does it learn there as it does on CPU? (issue 14)
#
# Trains configs/fmnist_cpu.yaml for one epoch's schedule (937 iterations, one process, bf16 autocast,
# loader workers), prints the DINO loss at iterations 100/300/600/937 and the full kNN (k=20, 60k/10k)
# beside the CPU figure of the same command and seed (BENCHMARKS.md section 1b), and exits non-zero
# when the run collapsed (the collapse watch stops it) or its kNN is more than 3 points below the CPU one.
# About 3-5 minutes on an H100-class GPU.
#
# On the GPU machine (no network), from the project root, after ../shared/gpu/prepare here:
#   source .gpu/env.sh && bash benchmarks/gpu_check.sh            # writes to $OUT or /tmp
# Knobs (environment): DEVICE (cuda), PRECISION (bf16 | fp32), SEEDS ("0 1"), EPOCHS (1.0), WORKERS (6),
# LIMIT_EVAL (empty: the full sets). A dry run on CPU: DEVICE=cpu EPOCHS=0.02 LIMIT_EVAL=500 WORKERS=0
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
PRECISION=${PRECISION:-bf16}
SEEDS=${SEEDS:-"0 1"}
EPOCHS=${EPOCHS:-1.0}
WORKERS=${WORKERS:-6}
LIMIT_EVAL=${LIMIT_EVAL:-}
OUT_ROOT=${OUT:-/tmp}/gpu_check_$(date +%s)
PY=${PYTHON:-python3}
# The CPU figures of the same command, per torch version and seed (BENCHMARKS.md section 1b, filled from
# `benchmarks/seed_sweep.py --seeds 0-7` with each torch): "seed:kNN" pairs; a seed not listed is
# compared with the lowest of its version's band.
CPU_KNN_2_14=${CPU_KNN_2_14:-"0:76.49 1:71.16 2:73.74 3:74.01 4:75.45 5:74.21 6:74.10 7:74.65"}
CPU_KNN_2_11=${CPU_KNN_2_11:-"0:74.28 1:76.17 2:76.16 3:75.54 4:75.10 5:76.68 6:71.95 7:74.05"}
mkdir -p "$OUT_ROOT"
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
status=0
for seed in $SEEDS; do
    run="$OUT_ROOT/seed$seed"
    t0=$(date +%s)
    timeout 420 "$PY" -m dinolike.cli train --config configs/fmnist_cpu.yaml dist.local_processes=1 \
        run.device="$DEVICE" precision.cuda="$PRECISION" data.num_workers="$WORKERS" \
        data.pin_memory=$([ "$DEVICE" = cuda ] && echo true || echo false) run.progress=false \
        eval.knn_every=0 eval.final_knn=false optim.epochs="$EPOCHS" run.seed="$seed" \
        run.output_dir="$run" > "$run.log" 2>&1
    rc=$?
    t1=$(date +%s)
    knn=""
    if [ $rc -eq 0 ]; then
        limits=()
        [ -n "$LIMIT_EVAL" ] && limits=(--limit-train "$LIMIT_EVAL" --limit-val "$LIMIT_EVAL")
        timeout 300 "$PY" -m eval.knn --pretrained "$run/teacher_backbone.pth" --config "$run/config.yaml" \
            --train-dataset fmnist:train --val-dataset fmnist:test --output-dir "$run/eval_knn" \
            "${limits[@]}" >> "$run.log" 2>&1 \
            && knn=$("$PY" -c "import json; print(json.load(open('$run/eval_knn/results.json'))['metrics']['k20_top1'])")
    fi
    "$PY" - "$run" "$rc" "$knn" "$CPU_KNN_2_14" "$CPU_KNN_2_11" "$((t1 - t0))" "$DEVICE/$PRECISION" "$seed" <<'PY'
import json, sys
import torch
run, rc, knn, cpu214, cpu211, secs, where, seed = sys.argv[1:]
table = cpu211 if torch.__version__.startswith("2.11") else cpu214
figures = dict(pair.split(":") for pair in table.split())
low = figures.get(seed, min(figures.values(), key=float))
rows = {}
try:
    for line in open(f"{run}/metrics.jsonl"):
        r = json.loads(line)
        rows[r["iteration"]] = r
except FileNotFoundError:
    pass
last = max(rows) if rows else 0
at = [i for i in (100, 300, 600, 937) if i <= last] or ([last] if last else [])
loss = " / ".join(f"{rows[i]['dino_global_loss']:.3f}" for i in at) or "-"
ips = sum(r["img_per_s"] for r in rows.values()) / max(len(rows), 1)
verdict = "ok"
if rc != "0":
    tail = open(f"{run}.log").read().strip().splitlines()[-1:] or [""]
    verdict = f"FAILED (exit {rc}): {tail[0][:300]}"
elif not knn:
    verdict = "FAILED: no kNN result"
elif float(knn) < float(low) - 3:
    verdict = f"FAILED: kNN {float(knn):.2f} is more than 3 points below the CPU figure, {float(low):.2f}"
print(f"| {where} seed {seed} | dino_global_loss at {'/'.join(map(str, at))}: {loss} | "
      f"kNN k=20 {float(knn):.2f} (CPU {float(low):.2f}) | {secs} s, {ips:.0f} img/s | {verdict} |"
      if knn else f"| {where} seed {seed} | dino_global_loss at {'/'.join(map(str, at))}: {loss} | - | {secs} s | {verdict} |")
sys.exit(0 if verdict == "ok" else 1)
PY
    [ $? -eq 0 ] || status=1
done
echo "outputs: $OUT_ROOT"
exit $status
