#!/usr/bin/env bash
# Runs on a lent GPU machine (torch 2.11 + CUDA there): install the CUDA FBGEMM/torchrec pair from
# wheels carried in chunks to /tmp/w, run the GPU tests and the DLRM throughput benchmark. What it
# writes to $OUT belongs in benchmarks/results/<date>_<gpu name>/ (e.g. 2026-11-23_h100-80gb-hbm3/).
set -uo pipefail
cd "$(dirname "$0")/../.."
W=/tmp/w
cat $W/fbgemm.part* > $W/fbgemm_gpu-1.6.0-cp312-cp312-manylinux_2_28_x86_64.whl
echo "$(cat $W/fbgemm.sha256)  $W/fbgemm_gpu-1.6.0-cp312-cp312-manylinux_2_28_x86_64.whl" | sha256sum -c || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $W/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
python3 -c "import torch, fbgemm_gpu, torchrec, lightning; print(torch.__version__, torchrec.__version__, lightning.__version__, torch.cuda.get_device_name(0))" 2>&1 | tail -1 | tee -a $OUT/gpu.txt
python3 -m pytest -q -p no:cacheprovider tests/distributed/test_gpu_integration.py tests/unit/test_sharding_policy.py tests/unit/test_modules_and_hooks.py tests/unit/test_checkpoint_atomic.py tests/unit/test_embedding_optimizer.py 2>&1 | tail -15 | tee $OUT/gpu_tests.txt
for spec in "tiny 1.0 65536 6" "tiny 1.0 65536 12" "small 0.1 65536 12"; do
  set -- $spec
  python3 benchmarks/dlrm_throughput.py --model $1 --scale $2 --global-batch $3 --devices 1 --accelerator gpu \
    --steps 60 --warmup 10 --num-workers $4 --out $OUT/dlrm_throughput.json --label "$(nvidia-smi --query-gpu=name --format=csv,noheader)" \
    2>&1 | grep -E '^\{|Error|error' | tail -3
done
# Training alone (Merlin's way: batches generated once, kept on the GPU, cycled), pipelined and not,
# and with the largest tables offloaded to host memory (UVM caching) under a 2 GiB budget.
for extra in "" "--no-pipeline" "--offload uvm_caching --memory-budget 2GiB"; do
  python3 benchmarks/dlrm_throughput.py --model tiny --scale 1.0 --global-batch 65536 --devices 1 --accelerator gpu \
    --steps 60 --warmup 10 --device-resident 16 $extra --out $OUT/dlrm_throughput.json \
    --label "device-resident $extra $(nvidia-smi --query-gpu=name --format=csv,noheader)" 2>&1 | grep -E '^\{|Error|error' | tail -3
done
