#!/usr/bin/env bash
# The CUDA checks, as one short script for a lent GPU machine (about 10 minutes):
# the test suite with a GPU present, then the fused layer and the paper's plan at Phi-2
# width in bf16. Run from the repository root after `make setup`:
#     bash bench/gpu_check.sh 2>&1 | tee gpu_check.log
set -uo pipefail
py=.venv/bin/python
$py -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1
timeout 420 $py -m pytest -x -q -o addopts="" tests 2>&1 | tail -15
$py bench/fused_layer.py --device cuda --dtype bf16 --tokens 8192 --rounds 9 --inner 10
$py bench/fused_layer.py --device cuda --dtype fp32 --tokens 8192 --rounds 9 --inner 10
$py bench/paper_plan.py --device cuda --dtype bf16 --batch 8 --seq 512 --repeats 3
