#!/bin/bash
# Population-throughput benchmark on a lent GPU (one call). Writes $OUT/population_<model>.json incrementally.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout ${BENCH_TIMEOUT:-360} python3 experiments/bench_population.py --model ${MODEL:-cifar-ddpm} --pop 16 --batch 64 \
  --repeats 5 --steps 10 --cases fp32,fakequant_single,map,vmap,sample_fp32,sample_map,sample_vmap,loop,bf16 \
  --out $OUT/population_${MODEL:-cifar-ddpm}.json 2>&1 | grep -v -i "warn\|calibrate\|transformers"
# the ported google/ddpm-cifar10-32 UNet (random weights): per-candidate cost of the CIFAR-10 search
timeout ${CIFAR_TIMEOUT:-150} python3 experiments/bench_population.py --model ddpm-cifar10-32 --pop 16 --batch 64 \
  --repeats 3 --steps 10 --cases fp32,sample_fp32,sample_map \
  --out $OUT/population_ddpm-cifar10-32.json 2>&1 | grep -v -i "warn\|calibrate\|transformers"
# Stable Diffusion 1.x shapes in bf16 (random weights, guidance 7.5: two UNet passes per step)
timeout ${SD_TIMEOUT:-240} python3 experiments/bench_population.py --model sd-1.x --dtype bfloat16 --pop 4 \
  --batch 4 --repeats 2 --steps 4 --cases fp32,sample_fp32,sample_map \
  --out $OUT/population_sd-1.x.json 2>&1 | grep -v -i "warn\|calibrate\|transformers"
# FID feature extraction: random weights of the real shapes (the converted weights exceed the carry limit)
timeout ${FID_TIMEOUT:-120} python3 experiments/bench_fid.py --random_weights --batches 64,256 --sizes 32x3 \
  --precisions highest,default --out $OUT/fid_features.json 2>&1 | grep -v -i "warn"
# Deployment (issue 18): FP32 / dequant / int latency and memory of random-weight W8A8 checkpoints of the CIFAR-10
# and SD 1.x shapes (bf16 rows added on accelerators); which sites the int mode runs on integers is in the JSON
timeout ${DEPLOY_TIMEOUT:-300} python3 experiments/bench_deploy.py --random ddpm-cifar10-32,sd-1.x --repeats 20 \
  --random_steps 10 --out $OUT/deploy_shapes.json 2>&1 | grep -v -i "warn\|transformers"
