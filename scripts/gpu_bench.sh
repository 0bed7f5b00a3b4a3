#!/usr/bin/env bash
# One-shot GPU training benchmark (issue 7): gpt2-small, context 1024, bf16, the largest batch that fits.
#
#   bash scripts/gpu_bench.sh            # on a machine with one NVIDIA GPU
#
# Uses the system python3 as it is when it already has JAX with a GPU and jaxgpt's dependencies
# (run from the checkout, PYTHONPATH=.; nothing is installed: such machines may have no PyPI).
# Otherwise installs jaxgpt with JAX's CUDA 12 wheels (from PyPI) into /tmp/jaxgpt-gpuvenv. Then tries
# batch sizes from large to small and reports tokens/s and MFU (model FLOPs / the chip's dense bf16
# peak) of the first that fits, and where its step's GPU time goes (a jax.profiler trace of 3 steps).
# The settings are jaxgpt's GPU defaults (jaxgpt.config.backend_defaults): bf16 matmuls and
# activations, the 12 blocks unrolled. Dropout is off (as in GPT-2 reproductions such as llm.c), so
# attention runs as cuDNN flash attention; the loss is the chunked one (jaxgpt.loss.train_loss), so
# the logits of the whole batch are never held. About 1 minute per batch size tried (most of it the
# compile), plus 3 minutes of install where one is needed.
# JSON lines go to $OUT (or ./gpu_bench_out) as gpu_bench_B<batch>.json, the trace under profile/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-gpu_bench_out}"
mkdir -p "$OUT_DIR"
START=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if PYTHONPATH=. python3 -c "import jax, flax, optax, orbax.checkpoint, jaxgpt; assert jax.devices('gpu')" 2>/dev/null; then
  PY=python3
  export PYTHONPATH=.
  echo "using the system python3 (JAX with a GPU already installed)"
else
  VENV="${VENV:-/tmp/jaxgpt-gpuvenv}"
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" || { echo "python3 -m venv failed"; exit 1; }
  fi
  PY="$VENV/bin/python"
  $PY -m pip install -q --upgrade pip >/dev/null 2>&1
  $PY -m pip install -q -e . "jax[cuda12]" || { echo "pip install failed"; exit 1; }
fi
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" || exit 1
echo "install took $(( $(date +%s) - START )) s"

BATCHES="${BATCHES:-192 128 64 32 16 8}"
# the CPU allocator launcher is for CPU steps; XLA may take 90% of the GPU's memory
export JAXGPT_NO_RELAUNCH=1 XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
best=""
for B in $BATCHES; do
  echo "=== batch $B ($(( $(date +%s) - START )) s elapsed)"
  if timeout 240 $PY scripts/bench.py train --json --preset gpt2-small --context-length 1024 \
      --dtype bfloat16 --activation-dtype bfloat16 --scan-unroll 12 --vocab-pad-multiple 64 \
      --drop-rate 0.0 --loss chunked --batch-size "$B" --steps 10 --warmup 3 --references none \
      --profile "$OUT_DIR/profile" > "$OUT_DIR/gpu_bench_B$B.json" 2> "$OUT_DIR/gpu_bench_B$B.err"; then
    best=$B
    break
  fi
  tail -n 3 "$OUT_DIR/gpu_bench_B$B.err"
done
if [ -z "$best" ]; then echo "no batch size fitted"; exit 1; fi

$PY scripts/bench.py report "$OUT_DIR/gpu_bench_B$best.json"
echo "total $(( $(date +%s) - START )) s"
