#!/usr/bin/env bash
# Run ON the GPU machine, from the project root, as one device call (carry: [".whl"]; timeout_s 590: the steps below add up to about 540 s):
#   bash bench/gpu/check.sh
# First, on the CPU machine: bash bench/gpu/fetch-wheels.sh (the wheels the GPU machine lacks, into .whl/).
# It installs the carried wheels, shows the GPU, runs the smoke checks (one JSON line each, bench/gpu/gpu_smoke.py),
# the CUDA-relevant tests, the torchrun refusal of more ranks than GPUs, a short CUDA demo (train with autocast,
# predict on the GPU) and the predict benchmark with both sides on the GPU; logs and reports go under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported(), 'bf16 native', torch.cuda.is_bf16_supported(including_emulation=False))" | tee -a "$OUT/gpu.txt"
timeout 150 python3 bench/gpu/gpu_smoke.py 2>&1 | tee "$OUT/smoke.txt" | cut -c1-200
timeout 120 python3 -m pytest -m "not slow" -q -rfE -p no:cacheprovider tests/test_gpu_paths.py tests/test_train_stage.py \
  tests/test_predict_inference.py tests/test_predict_batch.py 2>&1 | tail -n 30 > "$OUT/pytest.txt"; tail -n 3 "$OUT/pytest.txt"
start=$(date +%s)
timeout 130 python3 -m pipeline demo --experiment gpu --set train.device=cuda --set predict.device=cuda 2>&1 | tr '\r' '\n' | grep -v "step/s" > "$OUT/demo.txt"
echo "demo on the GPU: exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s"; tail -n 8 "$OUT/demo.txt"
for f in outputs/gpu/train/report.json outputs/gpu/predict/report.json; do [ -f "$f" ] && cp "$f" "$OUT/$(echo "$f" | tr / _)"; done
# finding 1 on the real machine: more training ranks than GPUs must be refused before any NCCL call (each rank
# prints one line and exits 2; torchrun itself then exits 1)
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
timeout 40 python3 -m torch.distributed.run --standalone --nproc_per_node $((gpus + 1)) -m pipeline train \
  -c "$(python3 -c 'from pipeline.demo import demo_config_path; print(demo_config_path())')" --experiment gpu \
  --set train.device=cuda > "$OUT/torchrun_refusal.txt" 2>&1
echo "torchrun with $((gpus + 1)) ranks on $gpus GPU(s): exit $? ($(grep -m1 -o 'must be at most[^.]*' "$OUT/torchrun_refusal.txt"))"
timeout 80 python3 bench/predict.py --device cuda --shape 256 --slices 120 --repeats 1 --output "$OUT/bench_predict.json" \
  > "$OUT/bench_predict.txt" 2>&1; echo "bench/predict.py on the GPU: exit $?"; tail -n 12 "$OUT/bench_predict.txt"
