#!/usr/bin/env bash
# The GPU check of the performance issue, as one script for a lent machine (PyTorch, timm and
# Triton present; DeepSpeed carried as a wheel built with `pip wheel deepspeed --no-deps -w wheels/`).
#   bash scripts/device_bench.sh            -> tables in $OUT (or ./bench_out)
# Short warm-ups and few steps, largest models last, so a 10-minute call covers it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
pip install -q --no-deps wheels/deepspeed-*.whl 2>&1 | tail -1
pip install -q safetensors pyyaml tensorboard 2>/dev/null | tail -1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
export DS_ACCELERATOR=cuda
B="python scripts/bench_step.py --steps 10 --warmup 3"
$B --models vit_small_16 vit_base_16 --batch-sizes 64 256 \
   --deepspeed_config ds_configs/zero1_bf16.json --json "$OUT/small_base.json" 2>&1 | tail -8 | tee "$OUT/small_base.txt"
$B --models vit_large_7 --batch-sizes 32 --steps 5 --warmup 2 \
   --deepspeed_config ds_configs/zero2_bf16.json meta.activation_checkpointing=1 \
   --json "$OUT/large7.json" 2>&1 | tail -5 | tee "$OUT/large7.txt"
$B --models vit_base_4 --batch-sizes 16 --steps 5 --warmup 2 \
   --deepspeed_config ds_configs/zero2_bf16.json meta.activation_checkpointing=1 \
   --json "$OUT/base4.json" 2>&1 | tail -5 | tee "$OUT/base4.txt"
