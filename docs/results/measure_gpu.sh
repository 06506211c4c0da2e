#!/usr/bin/env bash
# The GPU measurements of issue 20, in one go (about 10 minutes on one H100/H200): the speed switches
# of the GPT lab, the optimizer steps against the memory-bandwidth floor, and the GPU checks of both.
# Run from the repository root on a machine with a CUDA GPU; writes docs/results/*_gpu.txt.
set -u
out=docs/results
python3 -m pytest -q tests/test_gpu.py -m gpu -k "speed_switch or fused_lamb" 2>&1 | tail -5 | tee $out/speed_gpu_checks.txt
python3 -m labkit.bench.speed --device cuda --steps 30 --output $out/speed_gpu.txt
python3 -m labkit.bench.optim --device cuda --sizes 100M --versions adamw adamw-fused lamb lamb-fused lamb-readable timm \
    --output $out/optim_gpu_100M.txt
# 1 B parameters: four copies of the model with their Adam state (about 52 GB) fit one 80 GB GPU
python3 -m labkit.bench.optim --device cuda --sizes 1B --versions adamw adamw-fused lamb lamb-fused --steps 10 \
    --output $out/optim_gpu_1B.txt
