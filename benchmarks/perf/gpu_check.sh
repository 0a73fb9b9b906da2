#!/usr/bin/env bash
# mergeengine on a GPU: the tinyllama-shape (1.1B, bf16, base + 3 fine-tunes) benchmark with
# --device cuda, plus the I/O floor, one run each, figures printed at the end. Self-contained:
# builds the checkpoints when missing (benchmarks/perf/_work/tinyllama, ~9 GB of disk, ~1-2 min),
# uses .venv/bin/python when it has a CUDA torch, else python3 (needs torch with CUDA, safetensors,
# pydantic, pyyaml, networkx, tqdm, numpy; psutil optional). Meant to finish in under 5 minutes.
#
#   bash benchmarks/perf/gpu_check.sh            # results in $OUT (when set) or benchmarks/perf/_work
#   METHODS=task_arithmetic,ties bash benchmarks/perf/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

METHODS="${METHODS:-task_arithmetic,ties,dare_ties,dppa,linear}"
DEST="${OUT:-benchmarks/perf/_work}"
mkdir -p "$DEST"

has_cuda() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
PY=""
for cand in .venv/bin/python python3; do
    if command -v "$cand" >/dev/null 2>&1 && has_cuda "$cand"; then PY="$cand"; break; fi
done
if [ -z "$PY" ]; then
    echo "gpu_check: no python with a CUDA-enabled torch (.venv/bin/python, python3)" >&2
    exit 2
fi
# mergeengine from this checkout when it is not installed.
if ! "$PY" -c 'import mergeengine' 2>/dev/null; then export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; fi

echo "== $(date -u +%FT%TZ) $(hostname)  python: $PY"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,utilization.gpu --format=csv,noheader || true
echo "cpus: $(nproc)  load: $(cut -d' ' -f1-3 /proc/loadavg)  free disk: $(df -h --output=avail . | tail -1)"

# GPU memory in use, sampled every 200 ms while the runs go (peak printed at the end).
SMI_LOG="$DEST/gpu_memory_used.csv"
SMI_PID=""
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$SMI_LOG" 2>/dev/null &
    SMI_PID=$!
fi
trap '[ -n "$SMI_PID" ] && kill "$SMI_PID" 2>/dev/null || true' EXIT

# cuda only, one repeat each, results beside (not into) benchmarks/perf/results.json, no doc update.
"$PY" benchmarks/perf/run.py --sizes tinyllama --tools floor,mergeengine --methods "$METHODS" \
    --device cuda --repeats 1 --busy-retries 0 --max-wait 0 --timeout 240 --no-cold-hash \
    --results "$DEST/gpu_results.json" --no-report

"$PY" - "$DEST/gpu_results.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
e = r["sizes"]["tinyllama"]
print(f"\ntinyllama: {e['params'] / 1e9:.2f}B params, bf16, base + {e['fine_tunes']} fine-tunes, --device cuda")
print(f"{'tool':12s} {'method':28s} {'wall s':>8s} {'CPU s':>8s} {'max RSS GiB':>12s} {'anon GiB':>9s} {'rc':>3s}")
for x in e["runs"]:
    print(f"{x['tool']:12s} {x['method']:28s} {x['wall_s']:8.2f} {x['cpu_s']:8.1f} "
          f"{x['max_rss_bytes'] / 2**30:12.2f} {x['peak_anon_bytes'] / 2**30:9.2f} {x['rc']:3d}")
EOF
if [ -n "$SMI_PID" ]; then
    kill "$SMI_PID" 2>/dev/null || true
    echo "peak GPU memory used during the runs: $(sort -n "$SMI_LOG" | tail -1) MiB (whole GPU, sampled every 200 ms)"
fi
