#!/bin/bash
# Population-throughput benchmark on a lent GPU (one call). Writes $OUT/population_<model>.json incrementally.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout ${BENCH_TIMEOUT:-270} python3 experiments/bench_population.py --model ${MODEL:-cifar-ddpm} --pop 16 --batch 64 \
  --repeats 5 --cases fp32,fakequant_single,vmap,map,loop,bf16 --out $OUT/population_${MODEL:-cifar-ddpm}.json 2>&1 \
  | grep -v -i "warn\|calibrate\|transformers"
