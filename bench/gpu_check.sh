#!/usr/bin/env bash
# make gpu-check: what only a CUDA machine can check, in one command from a bare clone
# (make installs .venv first), about 5 minutes on one H100/H200 and never over 8 (the two timeouts):
#   1. tests/test_gpu.py (marker `gpu`): bf16 LoRA and full fine-tuning, QLoRA nf4 on the
#      bitsandbytes CUDA kernels and its merge, paged AdamW, packed attention on CUDA (SDPA,
#      and flash-attention when installed), the GPU slot allocator on the real devices;
#   2. `ftflow bench --quick --gpu`: the bf16 training comparison on a Qwen3-0.6B-shaped
#      model (padded recipe, ftflow, and TRL's SFTTrainer for LoRA and full; the CPU sections
#      in quick mode), its GPU section written to bench/results-gpu.md.
# Every check fails loudly, never skips, when the machine has no working CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-bench/gpu-check}   # the bench's results.json and work folder (kept for the next run)

fail() { echo "gpu-check: FAILED: $*" >&2; exit 1; }

nvidia-smi -L || fail "nvidia-smi -L does not list a GPU (no NVIDIA driver here?)"
"$BIN/python" - <<'PY' || fail "torch sees no usable CUDA device (see the line above)"
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no CUDA device")
name = torch.cuda.get_device_name(0)
x = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
assert torch.isfinite(x @ x).all(), "a bf16 matmul on the GPU gave non-finite values"
print(f"gpu-check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s), {name}")
PY

echo "gpu-check: 1/2 tests marked gpu"
FTFLOW_REQUIRE_GPU=1 timeout 180 "$BIN/python" -m pytest tests/test_gpu.py -m gpu -v -p no:cacheprovider \
    || fail "tests/test_gpu.py (see above)"

echo "gpu-check: 2/2 ftflow bench --quick --gpu"
timeout 300 "$BIN/ftflow" bench --quick --gpu --out "$OUT" || fail "ftflow bench --quick --gpu"
"$BIN/python" - "$OUT/results.json" bench/results-gpu.md <<'PY' || fail "the bench's GPU section"
import json
import sys
from ftflow.bench.report import render_gpu_markdown
results = json.load(open(sys.argv[1], encoding="utf-8"))
if results["gpu"].get("skipped"):
    sys.exit(f"the bench skipped its GPU section: {results['gpu']['skipped']}")
for method in ("lora", "full"):
    trl = (results["gpu"].get("trl") or {}).get(method)
    if not trl or not trl.get("peak_gpu_mb"):
        sys.exit(f"the GPU section has no TRL {method} run with a peak GPU memory")
with open(sys.argv[2], "w", encoding="utf-8") as out:
    out.write(render_gpu_markdown(results))
print(f"gpu-check: wrote {sys.argv[2]}")
PY
echo "gpu-check: passed"
