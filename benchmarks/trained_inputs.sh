#!/bin/bash
# The trained-model inputs of RESULTS.md's kernel tables: trains the small preset with the backend's fast path (on an
# H200: Pallas, C=64, "default", cg_tol 1e-4, states saved) for 500 steps of 8 x 2048 bytes of an English text
# corpus (RESULTS uses the Python 3.11 docs' reST sources), then records the Mesa layer inputs of 16 heads spread
# over all layers at both kernel_bench shapes (benchmarks/record_inputs.py; ~400 MB each).
#   bash benchmarks/trained_inputs.sh CORPUS WORKDIR OUT_DIR   ->  OUT_DIR/inputs_8x2048.npz, OUT_DIR/inputs_2x8192.npz
# Then: python3 benchmarks/kernel_bench.py --inputs=OUT_DIR/inputs_8x2048.npz ...
set -euo pipefail
if [ $# -ne 3 ]; then
  echo "usage: bash benchmarks/trained_inputs.sh CORPUS WORKDIR OUT_DIR" >&2
  exit 2
fi
corpus=$1 workdir=$2 out=$3
mkdir -p "$out"
python3 -m experiments.train --workdir="$workdir" --config=experiments/configs/lm.py:mesanet,small,15b \
  --config.data.source=text --config.data.path="$corpus" --config.data.tokenizer=bytes \
  --config.train.batch_size=8 --config.train.num_steps=500 --config.train.log_every=50 \
  --config.train.eval_every=500 --config.train.eval_batches=4 --config.optim.warmup_steps=100 \
  --config.checkpoint.every_steps=500 --config.model.scan_layers=True 2>&1 | tr '\r' '\n' | grep -v "it/s"
python3 benchmarks/record_inputs.py --workdir="$workdir" --batch=8 --length=2048 --heads=16 \
  --out="$out/inputs_8x2048.npz"
python3 benchmarks/record_inputs.py --workdir="$workdir" --batch=2 --length=8192 --heads=16 \
  --out="$out/inputs_2x8192.npz"
