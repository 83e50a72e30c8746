#!/usr/bin/env bash
# One check of the GPU path, end to end, on one H100/H200-class card (aimed at about seven minutes):
#   1. training throughput, reference configuration (ResNet-50, 448 px, batch 32+32, MixOE step):
#      our data path beside the reference-style one (PIL + normalise in 4 workers, fp32) and the
#      compute-only ceiling;
#   2. a short MixOE fine-tune of Oxford 17 Flowers at 224 px to a bundle (`mixoe pipeline`, under
#      torchrun when there are several GPUs);
#   3. the service on that bundle under the serve benchmark, beside the raw batched model rate: one
#      server process and four sharing the GPU (MIXOE_WORKERS), four and eight with one model
#      process for all (MIXOE_MODEL_PROCESS), eight with a model process and the JPEGs decoded
#      by nvjpeg instead of the workers' CPUs, and a naive one-image-per-forward server; then four
#      (and four with a model process) again with eight
#      images per request (and, with MPS=1, four and eight workers under NVIDIA's Multi-Process
#      Service);
#   4. upload bytes -> model crop: PIL beside torchvision on the CPU and nvjpeg on the GPU (speed,
#      and the largest pixel difference from the PIL crop the thresholds were calibrated on).
# Prints one table last and writes JSON under $OUT_DIR.
#
# For a GPU machine that cannot install packages: on a machine with pip, download the few pure
# Python wheels the project needs beyond torch/torchvision/numpy/pillow (see README, "GPU check")
# into a folder, copy it over and point WHEELS at it; they are installed into a private folder.
#
#   FLOWERS=../shared/data/flowers17 TINY=../shared/data/tinyimagenet200 bash benchmarks/gpu_check.sh
#
# QUICK=1 runs every step at toy sizes (ResNet-18 at 64 px, one epoch, seconds of serving): a dry
# run of this script on any machine, a CPU included, so a GPU session is not spent on a typo.
# PY_SPY=/path/to/py-spy (a static binary, e.g. from the py-spy wheel) samples the model process
# during the serve runs and prints where its time went.
# ONLY="serve decode" runs only the steps named (train, fine-tune, serve, serve-multi, serve-mps,
# decode); without fine-tune, the later steps use the embedded default model (MobileNetV2 on
# Flowers-17), so a short second device call can measure the service alone.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-benchmarks/out/gpu_check$([ "${QUICK:-0}" = 1 ] && echo _quick)}
FLOWERS=${FLOWERS:-../shared/data/flowers17}
TINY=${TINY:-../shared/data/tinyimagenet200}
PYTHON=${PYTHON:-python3}
# A fresh fine-tune each time, never a resumed one, and no result of an earlier run in the summary.
rm -rf "$OUT_DIR/run" "$OUT_DIR/repository" "$OUT_DIR"/*.json
mkdir -p "$OUT_DIR"
if [ "${QUICK:-0}" = 1 ]; then
  train_sizes=(--arch resnet18 --size 64 --batch 8 --warmup 1 --steps 3 --workers 2 --reference-workers 2)
  pipeline_sizes=(--set epochs=1 --set baseline.epochs=1 --set data.transforms.input_size=64
                  --set data.transforms.resize=73 --set data.num_workers=2)
  decode_sizes=(--max-images 40 --threads 1 2)
  serve_sizes=(--max-images 64 --workers 1 2 --model-process 2 --clients 8 --client-processes 2 --duration 3
               --raw-seconds 1)
  serve_multi_sizes=(--max-images 64 --workers 2 --model-process 2 --images-per-request 4 --clients 8 --duration 3
                     --raw-seconds 1)
else
  train_sizes=(--arch resnet50 --size 448 --batch 32)
  pipeline_sizes=(--set epochs=3 --set baseline.epochs=3)
  decode_sizes=(--threads 1 8)
  serve_sizes=(--workers 1 4 --model-process 4 8 --clients 64 --duration 8 --requests 100000 --raw-seconds 4)
  serve_multi_sizes=(--workers 4 --model-process 4 --images-per-request 8 --clients 32 --duration 8 --requests 20000
                     --raw-seconds 2)
fi
if [ -n "${WHEELS:-}" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/mixoe-site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/mixoe-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -z "${PY_SPY:-}" ] || serve_sizes+=(--py-spy "$PY_SPY")
# Fail now, not after minutes of training, if a package the later steps import is missing.
"$PYTHON" -c "import service.app, service.__main__, training.cli, httpx, uvicorn"
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
WEIGHTS=$("$PYTHON" -c "from models.network.weights import offline_mobilenet_v2_weights as w; print(w())")
echo "gpu_check: $GPUS GPU(s); output in $OUT_DIR"

# A device session is short and may not come twice: a failed step is reported and the steps that
# do not need its output still run. Exit status 1 if any step failed.
failed=()
wanted() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }
step() {  # step NAME COMMAND...
  local name=$1 started=$SECONDS
  shift
  wanted "$name" || return 0
  echo "== $name ($(date +%T))"
  if "$@"; then
    echo "== $name: done in $((SECONDS - started)) s"
  else
    echo "== $name: FAILED (exit $?) after $((SECONDS - started)) s"
    failed+=("$name")
  fi
}
BUNDLE=$OUT_DIR/repository/flowers17-mixoe/1
wanted fine-tune || BUNDLE=models/repository/flowers17/2
needs_bundle() {
  [ -d "$BUNDLE" ] || { echo "no bundle at $BUNDLE: the fine-tune step failed"; return 1; }
  "$@"
}

step train "$PYTHON" benchmarks/train_throughput.py "${train_sizes[@]}" \
  --data "$FLOWERS" --outliers "$TINY/train" --out "$OUT_DIR/train_throughput.json"

launcher=("$PYTHON" -m training)
[ "$GPUS" -gt 1 ] && launcher=(torchrun --standalone --nproc_per_node="$GPUS" -m training)
step fine-tune "${launcher[@]}" pipeline benchmarks/configs/flowers17_mixoe.yaml \
  --set pretrained="$WEIGHTS" --set data.root="$FLOWERS" --set outliers.root="$TINY/train" \
  --set evaluation.ood_sets.coarse="$TINY/val" "${pipeline_sizes[@]}" \
  --set export.repository="$OUT_DIR/repository" --output-dir "$OUT_DIR/run"

step serve needs_bundle "$PYTHON" benchmarks/serve_bench.py --bundle "$BUNDLE" \
  --images "$FLOWERS/images" "${serve_sizes[@]}" --out "$OUT_DIR/serve_bench.json"

# The same servers with several images per request: what is left of the gap to the raw rate once
# the per-request cost (HTTP, multipart parsing, one response) is shared.
step serve-multi needs_bundle "$PYTHON" benchmarks/serve_bench.py --bundle "$BUNDLE" \
  --images "$FLOWERS/images" "${serve_multi_sizes[@]}" --skip-naive --out "$OUT_DIR/serve_bench_multi.json"

# MPS=1: four and eight workers again (and eight decoding JPEGs on the CPU) under NVIDIA's
# Multi-Process Service, which lets several processes' kernels run on the GPU together instead of
# taking turns. An experiment, off by default: whether the machine allows an MPS daemon at all is
# part of what it finds out.
with_mps() (  # a subshell: the MPS variables stay in it, and the daemon stops however it ends
  dir=$(mktemp -d)
  export CUDA_MPS_PIPE_DIRECTORY=$dir/pipe CUDA_MPS_LOG_DIRECTORY=$dir/log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d || { rm -rf "$dir"; exit 1; }
  trap 'echo quit | nvidia-cuda-mps-control; rm -rf "$dir"' EXIT
  "$@"
)
if [ "${MPS:-0}" = 1 ]; then
  step serve-mps needs_bundle with_mps "$PYTHON" benchmarks/serve_bench.py --bundle "$BUNDLE" \
    --images "$FLOWERS/images" "${serve_sizes[@]}" --workers 4 8 --model-process --skip-naive \
    --out "$OUT_DIR/serve_bench_mps.json"
fi

step decode needs_bundle "$PYTHON" benchmarks/decode_bench.py --bundle "$BUNDLE" \
  --images "$FLOWERS/images" "${decode_sizes[@]}" --out "$OUT_DIR/decode_bench.json"

"$PYTHON" - "$OUT_DIR" ${failed[@]+"${failed[@]}"} <<'PY'
import json, sys
from pathlib import Path
out, failed = Path(sys.argv[1]), sys.argv[2:]
def read(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None
def shown(value, form):
    return "-" if value is None else form.format(value)
rows, machines = [], set()
if train := read("train_throughput.json"):
    machines.add(train["machine"])
    rates = {r["variant"]: r["id_images_per_second"] for r in train["rows"]}
    rows += [(f"train {v} (ID img/s)", f"{rate:.1f}") for v, rate in rates.items()]
    if "reference" in rates and "ours" in rates:
        rows.append(("train ours / reference", f"{rates['ours'] / rates['reference']:.2f}"))
if evaluation := read("run/finetune/evaluation.json"):
    msp = evaluation["scores"]["msp"]
    rows += [("flowers17 MixOE ID accuracy", f"{evaluation['id_accuracy']:.3f}"),
             ("flowers17 MixOE fine AUROC (msp)", f"{msp['fine']['auroc']:.3f}"),
             ("flowers17 MixOE coarse AUROC (msp)", f"{msp['coarse']['auroc']:.3f}")]
for name, tag in (("serve_bench.json", ""), ("serve_bench_multi.json", ""), ("serve_bench_mps.json", ", MPS")):
    if serve := read(name):
        machines.add(serve["machine"])
        per_request = serve["images_per_request"]
        for r in serve["results"]:
            label = r["config"] + (f", {per_request} img/request" if per_request > 1 else "") + tag
            rows.append((f"serve {label} (img/s, p95 ms, x raw, CPU ms/img, busiest loop, busiest client, GPU busy)",
                         f"{r['images_per_s']:.1f}, {shown(r['p95_ms'], '{:.1f}')}, {r['vs_raw']:.2f}, "
                         f"{shown(r['cpu_ms_per_image'], '{:.2f}')}, {shown(r['busiest_loop_share'], '{:.0%}')}, "
                         f"{shown(r['busiest_client_share'], '{:.0%}')}, {shown(r.get('gpu_busy_share'), '{:.0%}')}"))
if decode := read("decode_bench.json"):
    machines.add(decode["machine"])
    for r in decode["rows"]:
        rows.append((f"decode {r['path']} x{r['threads']} threads (img/s, x pil, max abs diff, same class, max score change)",
                     f"{r['images_per_s']:.0f}, {r['vs_pil']:.2f}, {r['max_abs_diff']}, {r['same_class']:.3f}, "
                     f"{r['max_score_change']:.4f}"))
machine = ", ".join(sorted(machines)) or "unknown"
(out / "gpu_check.json").write_text(json.dumps({"machine": machine, "failed": failed, "rows": dict(rows)}, indent=2))
print(f"\nGPU check on {machine}\n| measurement | value |\n|---|---|")
for name, value in rows:
    print(f"| {name} | {value} |")
if failed:
    print(f"\nFAILED steps: {', '.join(failed)} (their output is above)")
PY
[ ${#failed[@]} -eq 0 ]
