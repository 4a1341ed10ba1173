#!/usr/bin/env bash
# bash scripts/gpu_check.sh              # on a lent GPU: ~0.5B random Llama, bf16; well under 8 minutes
# bash scripts/gpu_check.sh --smoke      # the tiny model on CPU, seconds (checks the script)
# bash scripts/gpu_check.sh --size 1b    # any flag of scripts/gpu_check.py
# Prints a table (step time with / without AGFT's gate, peak memory, attribution pass time) and writes
# $OUT/gpu_check.json when $OUT is set. Stops itself after 450 s.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader; fi
exec timeout 450 "$PY" scripts/gpu_check.py "$@"
