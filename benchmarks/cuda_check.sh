#!/usr/bin/env bash
# The CUDA checks, as one script for a machine with a GPU (and torch, scipy, scikit-learn,
# pytest there): the device tests, then the regularizer and engine benchmarks on the GPU.
# Usage: OUT=/some/dir bash benchmarks/cuda_check.sh   (logs and tables land in $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/cuda_check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, scipy, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -rs tests/test_device.py tests/test_eigen.py \
    "tests/test_regularizer.py::test_cuda_model" "tests/test_cli.py::test_measure_device_option" \
    tests/test_regularizer.py tests/test_regularizer_graphs.py 2>&1 | tee "$OUT/pytest.log"
python3 benchmarks/bench_regularizer.py --device cuda --threads 8 2>&1 | tee "$OUT/bench_regularizer_cuda.log"
python3 benchmarks/bench_regularizer.py --device cuda --large --threads 8 2>&1 | tee -a "$OUT/bench_regularizer_cuda.log"
python3 benchmarks/bench_clusterability.py --cases mlp20k,pruned100k --device cuda \
    --out "$OUT/clusterability_cuda.md" 2>&1 | tee "$OUT/bench_clusterability_cuda.log"
