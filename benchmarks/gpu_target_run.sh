#!/usr/bin/env bash
# One device call for the error-target path (issue 13): carried wheels, build, the cuda tests
# of the target path's kernels, the stage profile and the matched-accuracy table.
#   bash benchmarks/gpu_target_run.sh [matched-accuracy budget seconds] [shapes] [families]
set -u
OUT=${OUT:-./gpu_target_out}
mkdir -p "$OUT"
for w in .whl/*.whl; do python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/site')" "$w"; done
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
python3 benchmarks/gpu_check.py --stages build 2>&1 | tail -3
python3 -m pytest -q -m cuda -x tests/test_sampled_scores.py tests/test_target_l1.py tests/test_cuda_kernels.py 2>&1 | tail -15
for shape in wan cogvideox; do python3 benchmarks/target_profile.py --shape $shape --topk 0.2 2>&1 | tail -22; done
python3 benchmarks/matched_accuracy.py --shapes "${2:-wan,cogvideox}" ${3:+--families $3} --budget "${1:-240}" 2>&1 | tee "$OUT/matched_accuracy.log" | tail -40
