#!/bin/bash
# Population-throughput benchmark on a lent GPU (one call). Writes $OUT/population_<model>.json incrementally.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout ${BENCH_TIMEOUT:-360} python3 experiments/bench_population.py --model ${MODEL:-cifar-ddpm} --pop 16 --batch 64 \
  --repeats 5 --steps 10 --cases fp32,fakequant_single,map,vmap,sample_fp32,sample_map,sample_vmap,loop,bf16 \
  --out $OUT/population_${MODEL:-cifar-ddpm}.json 2>&1 | grep -v -i "warn\|calibrate\|transformers"
# FID feature extraction: random weights of the real shapes (the converted weights exceed the carry limit)
timeout ${FID_TIMEOUT:-120} python3 experiments/bench_fid.py --random_weights --batches 64,256 --sizes 32x3 \
  --precisions highest,default --out $OUT/fid_features.json 2>&1 | grep -v -i "warn"
