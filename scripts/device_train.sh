#!/bin/bash
# Train the default checkpoint on a lent GPU (one call). Usage on the device machine: bash scripts/device_train.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/gpu.txt
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a $OUT/gpu.txt
timeout ${TRAIN_TIMEOUT:-420} python3 experiments/train.py --config experiments/configs/train_default.py \
  --workdir /tmp/train "$@" 2>&1 | tr '\r' '\n' | grep -v "^train: .*[1-9]%" | tail -40 | tee $OUT/train_log.txt
python3 - <<'PY'
import os, shutil, json
from tmpq_jax import checkpoint
out = os.environ["OUT"]
st = checkpoint.load_tree("/tmp/train/train_state.msgpack")
print("state step", int(st["step"]))
checkpoint.save_tree(f"{out}/ema_params.msgpack", st["ema_params"])
json.dump({"step": int(st["step"])}, open(f"{out}/state_step.json", "w"))
for f in ("train_summary.json", "samples.png"):
    if os.path.exists(f"/tmp/train/{f}"):
        shutil.copy(f"/tmp/train/{f}", out)
PY
ls -la $OUT
