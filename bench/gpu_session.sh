#!/bin/bash
# One lent-GPU call: the GPUs' own speed, the CUDA-graph tests, then the product benchmark.
# Usage (repository root, ComfyUI tree in .comfy, torchsde/trampoline/av stub in .benchsite):
#   bash bench/gpu_session.sh MODEL "VARIANTS" DEVICES[;DEVICES...]
# e.g. PP_COUNTS_2=2,8 PP_COUNTS_4=4,16 PP_GPU_TESTS=tests/test_patch_graphs.py \
#        bash bench/gpu_session.sh flux patches "cuda:0,cuda:1;cuda:0,cuda:1,cuda:2,cuda:3"
set -o pipefail
model=$1; variants=$2; IFS=';' read -ra layouts <<< "$3"
out=${OUT:-/tmp/pp-out}; mkdir -p "$out"
export COMFYUI_ROOT=$PWD/.comfy PYTHONPATH=$PWD/.benchsite PYTHONUNBUFFERED=1 PP_BENCH_MODELS=/tmp/pp-bench-models
nvidia-smi --query-gpu=index,name,memory.used,utilization.gpu --format=csv | tee "$out/gpus.csv"
python3 - <<'PY' | tee "$out/gpu_speed.txt"
import torch, time
for d in range(torch.cuda.device_count()):  # the one-GPU baseline of every card: a bf16 matmul
    a = torch.randn(8192, 8192, device=f"cuda:{d}", dtype=torch.bfloat16)
    for _ in range(3): a @ a
    torch.cuda.synchronize(d); t = time.perf_counter()
    for _ in range(20): a @ a
    torch.cuda.synchronize(d); dt = (time.perf_counter() - t) / 20
    print(f"cuda:{d} {torch.cuda.get_device_name(d)}: 8192^3 bf16 matmul {dt * 1e3:.2f} ms = {2 * 8192**3 / dt / 1e12:.0f} TFLOP/s")
PY
if [ -n "$PP_GPU_TESTS" ]; then
  python3 -m pytest -q -x -p no:cacheprovider $PP_GPU_TESTS 2>&1 | tee "$out/gpu_tests.log" | tail -15
fi
for devs in "${layouts[@]}"; do
  n=$(awk -F, '{print NF}' <<< "$devs")
  v=PP_COUNTS_$n; export PP_BENCH_PATCH_COUNTS=${!v:-8}  # extra patch counts per layout size
  python3 bench/bench_product.py --devices "$devs" --model "$model" --variants "$variants" \
    --out "$out/${n}gpu_${model}.json" 2>&1 | tee "$out/${n}gpu_${model}.log" | grep -v "^\s*$" | tail -60
done
