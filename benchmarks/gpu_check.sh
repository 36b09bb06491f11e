#!/usr/bin/env bash
# GPU throughput check (about 3-5 minutes on one NVIDIA GPU). Not part of CI: run it by hand on a GPU box.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#   GPU_CHECK_COMPILE=1 bash benchmarks/gpu_check.sh   # also time torch.compile'd networks
#
# Prints, for the 4-network ensemble on CUDA:
#   1. compute only: pre-made 224x224 uint8 batches through Ensemble.score (fp16 autocast, channels_last)
#      at batch 64/128/256                                       target >= 3,000 images/s
#   2. end to end: 2048x2048 8-bit PNGs through pipeline.score_chunk with decode_threads = nproc, next to
#      the pure decode rate of all CPU cores                     target >= 80% of the decode rate
#   3. decode + preprocess ms per image per format (one core), to see which formats are decode-bound.
# Without a CUDA device it says so, runs a tiny CPU smoke of the same scripts and exits 2.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=.venv/bin/python
IMAGES=${GPU_CHECK_IMAGES:-256}
CORES=$(nproc)

if [ ! -x "$PY" ]; then
    echo "== no .venv here: trying to create one (needs a package index; set PIP_INDEX_URL for a mirror)"
    if ! { python3 -m venv .venv && .venv/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1 &&
        .venv/bin/pip install --quiet -e .; }; then
        echo "!! could not create .venv (no network or no mirror?). Needed: python3 -m venv .venv;"
        echo "!!   .venv/bin/pip install torch==2.14.1 torchvision==0.29.1 && .venv/bin/pip install -e ."
        exit 3
    fi
fi
if ! "$PY" -c "import torch, torchvision, deepcovid.pipeline" 2>/dev/null; then
    echo "!! .venv lacks torch, torchvision or this project: .venv/bin/pip install -e . (and torch==2.14.1)"
    "$PY" -c "import torch, torchvision, deepcovid.pipeline"
    exit 3
fi

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "!! no CUDA device: torch $("$PY" -c 'import torch; print(torch.__version__)') sees no GPU"
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "   (nvidia-smi is not installed)"; fi
    echo "== CPU smoke of the same scripts instead (tiny sizes; numbers mean nothing)"
    "$PY" benchmarks/ensemble_throughput.py --device cpu --images 2 --batch-sizes 2 --repeats 1 \
        --size 256 --no-reference --no-eager || exit 1
    "$PY" benchmarks/decode_preprocess.py --repeat 1 --only "512x512" || exit 1
    echo "!! no CUDA device: GPU check NOT run"
    exit 2
fi

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
echo "cores: $CORES, images: $IMAGES"

echo
echo "== 1+2. compute ceiling (fp16 autocast, channels_last) and 2048x2048 PNG end to end, decode_threads=$CORES"
"$PY" benchmarks/ensemble_throughput.py --device cuda --precision fp16 --images "$IMAGES" \
    --batch-sizes 64 128 256 --repeats 3 --size 2048 --decode-threads "$CORES" --reference-images 8 --no-eager

if [ "${GPU_CHECK_COMPILE:-0}" = "1" ]; then
    echo
    echo "== 1b. the same with torch.compile (compile time not counted; warm-up compiles)"
    "$PY" benchmarks/ensemble_throughput.py --device cuda --precision fp16 --images "$IMAGES" \
        --batch-sizes 128 256 --repeats 3 --size 2048 --decode-threads "$CORES" --no-reference \
        --no-eager --compile
fi

echo
echo "== 3. decode + preprocess per format, ms per image on one core"
"$PY" benchmarks/decode_preprocess.py --repeat 3

echo
echo "targets: compute ceiling >= 3000 images/s at some batch size; worker end to end >= 80% of the"
echo "'decode+preprocess only' row (all $CORES cores decoding)."
