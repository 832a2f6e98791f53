#!/usr/bin/env bash
# bash bench/gpu_check.sh [--dry-run]
#
# Everything that needs a GPU, in one go (< 8 minutes on one GPU), for the day one is lent:
#   1. the GPU tests, none skipped (tests/test_gpu.py; a skip fails the check);
#   2. FSDP2 on all available GPUs (NCCL): fp32 losses equal one GPU's to 1e-5 on fixed batches,
#      then bf16-true with finite losses (tests/fsdp2_fit.py, the CPU test's script);
#   3. ETPO training and sampling throughput on a ~125M random Llama in bf16 (bench/gpu_throughput.py).
# Results: bench/results/gpu_<device>.json (device name, GPU count, each step's status and numbers).
# --dry-run: the same steps on the CPU at toy size (pytest collects the GPU tests without
# running them, FSDP2 on 2 gloo ranks, a 2-layer model), writing to a temporary folder: checks
# the script itself on any machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)

if (( DRY )); then
  DEVICE=cpu-dry-run; NGPU=2; ACCEL=cpu; OUT_DIR="$WORK"
else
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check: no CUDA GPU visible (use --dry-run on a CPU)" >&2; exit 2; }
  DEVICE=$(python -c "import torch, re; print(re.sub(r'[^A-Za-z0-9]+', '_', torch.cuda.get_device_name(0)).strip('_').lower())")
  NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
  ACCEL=gpu; OUT_DIR=bench/results
fi
RESULT="$OUT_DIR/gpu_${DEVICE}.json"
echo "gpu_check: device=$DEVICE gpus=$NGPU dry_run=$DRY -> $RESULT"

# 1. GPU tests, no skips.
if (( DRY )); then
  python -m pytest -q -m gpu tests/test_gpu.py --collect-only -p no:cacheprovider > "$WORK/pytest.txt" 2>&1 \
    && TESTS=collected || TESTS=failed
else
  python -m pytest -q -m gpu tests/test_gpu.py -rs -p no:cacheprovider > "$WORK/pytest.txt" 2>&1 \
    && TESTS=passed || TESTS=failed
  grep -q "skipped" "$WORK/pytest.txt" && TESTS="failed (tests skipped)"
fi
tail -3 "$WORK/pytest.txt"

# 2. FSDP2 on every GPU (at least 2 ranks on the dry run): fp32 equals one device, then bf16-true.
python -c "
from pathlib import Path; import sys
sys.path.insert(0, 'tests')
from helpers import tiny_llama
tiny_llama(64, seed=1).save_pretrained(Path('$WORK/model'))"
FIT=(python tests/fsdp2_fit.py --model "$WORK/model" --accelerator "$ACCEL")
"${FIT[@]}" "$WORK/one" --devices 1 > "$WORK/one.log" 2>&1
"${FIT[@]}" "$WORK/many" --devices "$NGPU" > "$WORK/many.log" 2>&1
"${FIT[@]}" "$WORK/bf16" --devices "$NGPU" --precision bf16-true > "$WORK/bf16.log" 2>&1
FSDP2=$(python - "$WORK" "$NGPU" <<'PY'
import json, math, sys, torch
work, n = sys.argv[1], int(sys.argv[2])
one = torch.load(f"{work}/one/rank0.pt", weights_only=False)
many = [torch.load(f"{work}/many/rank{r}.pt", weights_only=False) for r in range(n)]
bf16 = [torch.load(f"{work}/bf16/rank{r}.pt", weights_only=False) for r in range(n)]
loss_err = max(abs(sum(r["losses"][s][k] for r in many) / n - v) for s, step in enumerate(one["losses"]) for k, v in step.items())
weight_err = max(float((many[0]["weights"][net][k] - v).abs().max()) for net, sd in one["weights"].items() for k, v in sd.items())
finite = all(math.isfinite(v) for r in bf16 for step in r["losses"] for v in step.values())
print(json.dumps({"ranks": n, "device": many[0]["device"], "max_loss_error": loss_err, "max_weight_error": weight_err,
                  "equal_to_1e-5": loss_err < 1e-5 and weight_err < 1e-5, "bf16_true_finite": finite,
                  "local_bytes_per_rank": [r["local_bytes"] for r in many], "full_bytes": one["full_bytes"],
                  "step_s_one": one["times"], "step_s_sharded": many[0]["times"], "step_s_bf16": bf16[0]["times"]}))
PY
)
echo "fsdp2: $FSDP2"

# 3. Throughput on a ~125M random model (a 2-layer one on the dry run).
if (( DRY )); then
  THROUGHPUT=$(python bench/gpu_throughput.py --device cpu --dtype float32 --tiny --steps 1 --batch 2 --prompt-tokens 8 --action-tokens 4 2>/dev/null | tail -1)
else
  THROUGHPUT=$(python bench/gpu_throughput.py --device cuda --dtype bfloat16 2>/dev/null | tail -1)
fi
echo "throughput: $THROUGHPUT"

python - "$RESULT" "$DEVICE" "$NGPU" "$TESTS" "$FSDP2" "$THROUGHPUT" "$(( $(date +%s) - START ))" <<'PY'
import json, sys
path, device, ngpu, tests, fsdp2, throughput, seconds = sys.argv[1:]
json.dump({"device": device, "gpus": int(ngpu), "gpu_tests": tests, "fsdp2": json.loads(fsdp2),
           "throughput_125m": json.loads(throughput), "seconds": int(seconds)}, open(path, "w"), indent=2)
print(f"gpu_check: wrote {path} in {seconds} s")
PY
[[ "$TESTS" == passed || "$TESTS" == collected ]] && python -c "import json,sys; d=json.load(open('$RESULT'))['fsdp2']; sys.exit(0 if d['equal_to_1e-5'] and d['bf16_true_finite'] else 1)"
