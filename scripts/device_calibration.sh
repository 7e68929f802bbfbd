#!/bin/bash
# The calibration benchmark's 100-step rows (and reconstruction) on a lent GPU, in one call. It calibrates every
# stage and samples each row into $OUT/calibration (tables and images, no scoring: the Inception weights stay
# here); then, on this machine, score what came back (same tables and noise, so the images are reused):
#   python experiments/quant_quality.py --workdir <files_at>/calibration --schedules uniform100 \
#       --bits 8/8,7/7,6/6,5/6,6/5,5/5 --num_samples 500 --noise_seed 7 --out benchmarks/calibration_mnist-small_cpu.json
# Prepare .whl/ with the wheels of the project's pins for the device (as for scripts/device_bench.sh).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
timeout ${CALIB_TIMEOUT:-480} python3 experiments/quant_quality.py --sample_only --stages ${STAGES:-first_last,first_last_learned,split,learned,groups,mse} \
  --schedules uniform100 --bits 8/8,7/7,6/6,5/6,6/5,5/5 --num_samples 500 --noise_seed 7 \
  --workdir $OUT/calibration 2>&1 | tr '\r' '\n' | grep -v -i "warn\|%|" | tail -60 | tee $OUT/calibration_log.txt
