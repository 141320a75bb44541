#!/bin/bash
# Throughput of the real training command, A against B: the first SECONDS of
# `dinolike train --config CONFIG` with each set of overrides, one after the other, img/s from metrics.jsonl.
# Why not `dinolike bench`: the bench times one process; the CPU recipe runs 2 processes of 1 thread, and
# on this 2-core machine only the real layout shows what a change is worth (compile looked +7 % in the
# bench and was -5 % here). Run pairs back to back: this machine's speed drifts through the day.
#
#   bash benchmarks/train_ab.sh 120 configs/fmnist_cpu.yaml "data.augment_on_device=false" "data.augment_on_device=true"
#
# Prints one line per variant: its overrides, img/s of every metrics row, and their mean without the first
# (start-up) row.
set -euo pipefail
secs=$1 config=$2
shift 2
py=${PYTHON:-.venv/bin/python}
for overrides in "$@"; do
    out=$(mktemp -d /tmp/train_ab.XXXXXX)
    # shellcheck disable=SC2086  # overrides are space-separated key=value words on purpose
    timeout -s TERM "$secs" "$py" -m dinolike.cli train --config "$config" run.progress=false eval.knn_every=0 \
        eval.final_knn=false run.output_dir="$out" $overrides > "$out.log" 2>&1 || true
    "$py" - "$out/metrics.jsonl" "$overrides" <<'EOF'
import json
import sys

rates = [json.loads(line)["img_per_s"] for line in open(sys.argv[1]) if '"img_per_s"' in line]
if len(rates) < 2:
    sys.exit(f"{sys.argv[2]}: fewer than 2 metrics rows: run longer")
mean = sum(rates[1:]) / len(rates[1:])
print(f"{sys.argv[2] or '(no overrides)'}: {' '.join(f'{r:.0f}' for r in rates)} -> mean {mean:.1f} img/s")
EOF
    rm -rf "$out" "$out.log"
done
