#!/usr/bin/env bash
# Idempotent setup for a fresh machine: a virtual environment in .venv with torch and dinolike, and the
# Fashion-MNIST files the default run trains on. `setup.sh test` also installs the test dependencies.
# Set DINOLIKE_PYTHON to choose the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="cpu"
[ "${1:-}" = "test" ] && extras="cpu,test"

if [ ! -x .venv/bin/python ]; then
    "${DINOLIKE_PYTHON:-python3}" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    # torch first: 2.14.1 / 0.29.1 are the newest this project is tested with (>= 2.6 is supported)
    .venv/bin/pip install -q "torch>=2.6,<=2.14.1" "torchvision>=0.21,<=0.29.1"
fi
stamp=".venv/.dinolike-$extras-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    .venv/bin/pip install -q -e ".[$extras]"
    touch "$stamp"
fi

fm=/usr/share/datasets/fashion-mnist
if [ ! -f "$fm/train-images-idx3-ubyte.gz" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist, 31 MB)"
        apt-get install -y -q dataset-fashion-mnist >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
    else
        echo "Fashion-MNIST is missing: run 'sudo apt-get install -y dataset-fashion-mnist'" \
             "or put the four IDX .gz files in $fm (or pass data.train=fmnist:train:/your/dir)" >&2
        exit 1
    fi
fi
