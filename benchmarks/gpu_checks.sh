#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go: the CUDA-only tests and the GPU benchmarks.
#
#   bash benchmarks/gpu_checks.sh [RESULTS_DIR]        # default: gpu-results/
#
# Environment: DATA_DIR (the real data, default ../shared/data), TOKENIZER (the model whose tokenizer the
# random-weight Llama-7B benchmark uses, default smollm2-135m-instruct), SAMPLES (default 256),
# TESTS_TIMEOUT (seconds for each pytest step, default 300) and BENCH_TIMEOUT (default 330).
# Offline, set USE_HUB_KERNELS=0: transformers 5 otherwise reaches for hub kernels at model load.
# Each step logs to RESULTS_DIR and a failing step does not stop the next; the exit status is 1 if any failed.
set -u
cd "$(dirname "$0")/.."
results=${1:-gpu-results}
mkdir -p "$results"
data_dir=${DATA_DIR:-../shared/data}
tokenizer=${TOKENIZER:-smollm2-135m-instruct}
samples=${SAMPLES:-256}
failed=0
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    echo "== $name"
    timeout "$limit" "$@" >"$results/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$results/$name.log"
    echo "== $name: exit $rc in $((SECONDS - started)) s"
    [ "$rc" -eq 0 ] || failed=1
}

step versions 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "
import importlib.metadata as m, torch
print(\"cuda\", torch.version.cuda, torch.cuda.get_device_name(0))
for p in (\"torch\", \"transformers\", \"peft\", \"accelerate\", \"datasets\", \"bitsandbytes\"):
    print(p, m.version(p))"'
# Two pytest steps, so a time-out in one still leaves the other's report.
step cuda_tests "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py
step sharded_tests "${TESTS_TIMEOUT:-300}" python3 -m pytest -q -rs -p no:cacheprovider \
    "tests/train/test_distributed.py::test_sharded_engines_on_one_gpu_match_one_process"
step train_7b "${BENCH_TIMEOUT:-330}" python3 benchmarks/train_throughput.py --device cuda --arch llama-7b --model "$tokenizer" \
    --data_dir "$data_dir" --samples "$samples" --recipes original ours qlora --out "$results/train_7b.json"
exit $failed
