#!/bin/bash
# LayerScale on configs/folder_vits14.yaml shrunk to a CPU (BENCHMARKS.md section 7b): ViT pico, 32/16 px crops,
# patch 8, 4000 RGB images (tinted Fashion-MNIST), 600 iterations of batch 32 (0.6 "epoch" of 1000: the
# recipe's 10-epoch warmup is never reached, as in any run shortened this way); kNN on 1000 held-out images.
#
#   bash benchmarks/layerscale_trial.sh /tmp/ls_trial          # ~10 min per value on 2 quiet cores
#
# Prints, per LayerScale, the teacher's CLS cosine, its target entropy and the kNN at the logged rows.
set -euo pipefail
out=${1:?usage: layerscale_trial.sh OUT_DIR}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
"$py" - "$out" <<'PY'
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dinolike.data.datasets import FashionMNIST

out = Path(sys.argv[1])
for name, split, n in (("train", "train", 4000), ("val", "test", 1000)):
    fm, rng = FashionMNIST(split=split, limit=n), random.Random(0)
    for i in range(n):
        d = out / name / str(int(fm.labels[i]))
        d.mkdir(parents=True, exist_ok=True)
        g = fm.images[i].astype(np.float32)[..., None] / 255
        tint = np.array([rng.uniform(0.3, 1), rng.uniform(0.3, 1), rng.uniform(0.3, 1)])
        bg = np.array([rng.uniform(0, 0.3)] * 3)
        rgb = (g * tint + (1 - g) * bg) * 255
        Image.fromarray(rgb.astype(np.uint8)).resize((32, 32), Image.BICUBIC).save(d / f"{i}.jpg", quality=90)
PY
for ls in 1e-5 0.1 1.0; do
  "$py" -m dinolike.cli train --config configs/folder_vits14.yaml data.train="folder-nolabels:$out/train" \
    model.arch=vit_pico model.patch_size=8 model.img_size=32 crops.global_size=32 crops.local_size=16 \
    optim.epochs=0.6 data.batch_size=32 data.num_workers=0 data.pin_memory=false run.device=cpu \
    run.progress=false model.layerscale=$ls collapse.enabled=false eval.knn_every=150 \
    eval.knn_train="folder:$out/train" eval.knn_val="folder:$out/val" eval.knn_limit=4000 run.tensorboard=false \
    run.output_dir="$out/ls_$ls" > "$out/ls_$ls.log" 2>&1
  "$py" - "$out/ls_$ls/metrics.jsonl" "$ls" <<'PY'
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
cells = [f"{r['iteration']}: cos {r['cls_cosine']:.5f} H {r['teacher_entropy']:.3f}"
         + (f" kNN {r['knn_top1']:.1f}" if "knn_top1" in r else "") for r in rows if r["iteration"] % 100 == 0]
print(f"LayerScale {sys.argv[2]}: " + "; ".join(cells))
PY
done
