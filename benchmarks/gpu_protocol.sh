#!/usr/bin/env bash
# The GPU protocol of `python -m benchmarks.bench` on a lent device machine, in one call.
#
# The device image (see /work/.library/device/KINDS.md) has PyTorch, transformers, safetensors and imageio but not
# diffusers (the reference side), and nothing can be downloaded there. So, once, on the development machine:
#
#     bash benchmarks/gpu_protocol.sh prepare      # diffusers + importlib_metadata wheels into .whl/ (git-ignored)
#
# then one device call, carrying .whl, with a timeout that leaves time to rerun:
#
#     run(command="bash benchmarks/gpu_protocol.sh run", carry=[".whl"], timeout_s=420)
#
# and, if device time is left (compiling both UNets takes minutes), torch.compile's rows and a compiled job:
#
#     run(command="bash benchmarks/gpu_protocol.sh run compile", carry=[".whl"], timeout_s=560)
#
# `run` installs the wheels under /tmp/site, uses the repository in place (PYTHONPATH; the device's torch is not the
# pinned CPU build), prints the machine, runs a 20-second CUDA smoke of every section on the tiny config (a version
# problem shows there, cheaply), then the protocol. Its JSON and log land in $OUT; the JSON is rewritten after every
# section, so a run cut short keeps what it measured. Then give the machine back and put the tables in the README
# and docs/bench.md with the card's name and the date.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 importlib_metadata==8.7.0
    ls -l .whl
    ;;
run)
    out="${OUT:-/tmp/ei2-bench}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
    python3 -m benchmarks.bench --tiny --device cuda --size 64 --frames 2 --steps 2 --inference-steps 2 --repeats 1 \
        --json "$out/bench-smoke.json" > "$out/bench-smoke.log" 2>&1 || { tail -30 "$out/bench-smoke.log"; exit 1; }
    echo "smoke ok"
    if [ "${2:-}" = "compile" ]; then  # the second call, time permitting: torch.compile's rows and compiled job
        python3 -m benchmarks.bench --protocol gpu --sections train,job,targets --compile --time-budget 400 \
            --json "$out/bench-gpu-compile.json" 2>&1 | tee "$out/bench-gpu-compile.log"
    else
        python3 -m benchmarks.bench --protocol gpu --json "$out/bench-gpu.json" 2>&1 | tee "$out/bench-gpu.log"
    fi
    ;;
*)
    echo "usage: bash benchmarks/gpu_protocol.sh prepare | run [compile]" >&2
    exit 2
    ;;
esac
