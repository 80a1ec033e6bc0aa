#!/usr/bin/env bash
# GPU check for ersm on CUDA (energy layer, sparse suffix, and the prefix and
# dense baseline through tract-cuda), on an x86_64 machine with an NVIDIA GPU.
#
#   targets/gpu-check.sh OUT_DIR             build (if cargo is here), test, benchmark
#   targets/gpu-check.sh --package BIN_DIR   only build the binaries into BIN_DIR,
#                                            for a GPU machine without a Rust toolchain
#   targets/gpu-check.sh --package BIN.tar.xz   the same, packed (about a fifth
#                                            of the 100 MB the three binaries take)
#   ERSM_PREBUILT=BIN_DIR|BIN.tar.xz targets/gpu-check.sh OUT_DIR
#                                            use binaries from --package
#
# ERSM_CUDA_FEATURE picks the CUDA API level the binaries bind: cuda-12020
# (the default) for CUDA 12 libraries, cuda-13000 where the libraries are
# CUDA 13's (.so.13: a CUDA 13 toolkit or pip's nvidia-*-cu13 wheels). Without
# it, a build on the GPU machine picks from the NVRTC found there.
#
# Writes into OUT_DIR: gpu.txt (device), cuda-tests.log (CUDA parity tests:
# the energy layer, and the sparse suffix on the GPU against the CPU executor;
# run from the repository root, where the models are),
# ersm_stage.txt/.json (kernel µs/frame and GB/s by map size vs the CPU stage),
# bench-cuda.json and bench-cpu.json (`ersm bench` on the bundled model with the
# energy layer on each device, with their .txt tables), bench-cuda-graphs.json/
# .txt (the CUDA bench with ERSM_CUDA_GRAPHS=1), bench-cuda-faces.json/.txt and
# bench-cuda-faces-track.json/.txt (the face package on CUDA, frame by frame
# and as a tracked stream), profile-cuda.txt and
# profile-cuda-graphs.txt (each stage and each kind of suffix op on the GPU;
# the frame untimed, without and with graphs), compare-ort-cuda.json/.txt
# (ERSM and ersm dense on the GPU beside ONNX Runtime's CUDA provider, or why
# the latter is missing), compare-torch-cuda.json/.txt (the same beside
# PyTorch's cuDNN path, eager and as a CUDA graph, where torch has CUDA),
# sanitizer-*.txt (compute-sanitizer's memcheck and racecheck on the kernels'
# GPU tests, where it is installed), and timeouts.txt if a step ran past its
# limit or was skipped for want of time (ERSM_CHECK_SECONDS, default 560).
set -euo pipefail
cd "$(dirname "$0")/.."

package() {
    local dir=$1 feature=${ERSM_CUDA_FEATURE:-cuda-12020}
    mkdir -p "$dir"
    local features=(--no-default-features --features "$feature")
    cargo build --release "${features[@]}" --bin ersm
    local t b
    t=$(cargo test --release "${features[@]}" --no-run --test cuda 2>&1 | grep -o 'target/release/deps/cuda-[0-9a-f]*' | tail -1)
    b=$(cargo bench "${features[@]}" --no-run --bench ersm_stage 2>&1 | grep -o 'target/release/deps/ersm_stage-[0-9a-f]*' | tail -1)
    [ -n "$t" ] && [ -n "$b" ] || { echo "building the CUDA tests or the stage bench failed"; exit 1; }
    cp target/release/ersm "$dir/ersm"
    cp "$t" "$dir/cuda-tests"
    cp "$b" "$dir/ersm_stage"
    strip "$dir"/* 2>/dev/null || true
    echo "$feature" > "$dir/feature.txt"
    ls -la "$dir"
}

if [ "${1:-}" = "--package" ]; then
    dest=${2:?--package needs a folder or a .tar.xz path}
    case "$dest" in
    *.tar.xz)
        staging=$(mktemp -d)
        package "$staging/ersm-gpu-bin"
        tar -C "$staging" -cJf "$dest" ersm-gpu-bin
        rm -rf "$staging"
        ls -la "$dest"
        ;;
    *) package "$dest" ;;
    esac
    exit 0
fi

out=${1:?usage: targets/gpu-check.sh OUT_DIR}
mkdir -p "$out"
# Where pip's nvidia-* wheels put the CUDA libraries.
sitepkgs=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null || true)
bin=${ERSM_PREBUILT:-}
if [ -f "$bin" ]; then
    unpacked=$(mktemp -d)
    tar -C "$unpacked" -xJf "$bin" || { echo "$bin: not a .tar.xz from --package"; exit 1; }
    bin=$unpacked/ersm-gpu-bin
fi
if [ -z "$bin" ]; then
    command -v cargo >/dev/null || { echo "no cargo here: build with --package elsewhere and set ERSM_PREBUILT"; exit 1; }
    if [ -z "${ERSM_CUDA_FEATURE:-}" ]; then
        ERSM_CUDA_FEATURE=cuda-12020
        ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so\.13' && ERSM_CUDA_FEATURE=cuda-13000
        find /usr/local/cuda*/ $sitepkgs -name 'libnvrtc.so.13*' 2>/dev/null | grep -q . && ERSM_CUDA_FEATURE=cuda-13000
        export ERSM_CUDA_FEATURE
    fi
    bin=target/gpu-check-bin
    package "$bin"
fi

# cudarc loads NVRTC (the energy and suffix kernels) and tract-cuda also
# cudart, cuBLAS and cuDNN (the prefix and the dense baseline) at run time:
# find each where the loader does not know it (a toolkit, pip's nvidia-* wheels).
# cudarc asks for libX.so, then libX.so.NN of the CUDA it binds, then .so.12:
# where CUDA 12 and 13 libraries are both present, a binary bound to one could
# load the other's. So the search takes the major version the binaries were
# built for where it can (cuDNN's .so.9 serves both), and a plain libX.so link
# to what it found goes in a folder of our own, which the loader tries first.
links=/tmp/ersm-cudalibs
feature=$(cat "$bin/feature.txt" 2>/dev/null || echo unknown)
case "$feature" in
cuda-13000) major=13 ;;
cuda-12020) major=12 ;;
cuda-11040) major=11 ;;
*) major= ;;
esac
for name in nvrtc cudart cublas cublasLt cudnn; do
    want="lib$name\.so"
    [ -n "$major" ] && [ "$name" != cudnn ] && want="lib$name\.so\.$major"
    ldconfig -p 2>/dev/null | grep -q "$want" && continue
    found=$(find /usr/local/cuda*/ /usr/lib /opt "${HOME:-/root}" $sitepkgs -name "lib$name.so*" 2>/dev/null \
        | grep -v builtins | sort || true)
    lib=$(grep "/$want" <<< "$found" | head -1 || true)
    [ -n "$lib" ] || lib=$(head -1 <<< "$found")
    [ -n "$lib" ] || { echo "lib$name: not found (tract-cuda needs it; the CPU prefix serves then)"; continue; }
    note=
    [[ "$lib" =~ /$want ]] || note=" (no CUDA $major build found: it may not match binaries built with $feature)"
    mkdir -p "$links"
    [ -e "$(dirname "$lib")/lib$name.so" ] || ln -sf "$lib" "$links/lib$name.so"
    LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LD_LIBRARY_PATH
    echo "lib$name: $lib$note"
done
[ -d "$links" ] && export LD_LIBRARY_PATH="$links:$LD_LIBRARY_PATH"

{ nvidia-smi -L || true; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv || true
  echo "ersm built with: $feature"; } > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

# Each step has a time limit of its own: a hang on the GPU (a kernel that never
# ends, a driver wait) then costs that step alone, and the later steps still run
# and write their files, on a borrowed GPU machine whose time is short. The
# whole run also keeps within ERSM_CHECK_SECONDS (default 560, under a 600 s
# command limit): a step gets at most what is left, less 10 s for the summary,
# and one that would get under 10 s is skipped, so a slow machine loses the
# last steps rather than the files of all of them.
budget=${ERSM_CHECK_SECONDS:-560}
exec 3>&1
limited() {
    local secs=$1 rc=0 left=$((budget - SECONDS - 10))
    shift
    if [ "$left" -lt 10 ]; then
        echo "SKIPPED, out of time (${SECONDS} s of ${budget} s used): $(basename "$1") ${2:-}" | tee -a "$out/timeouts.txt" >&3
        return 124
    fi
    [ "$secs" -le "$left" ] || secs=$left
    timeout -k 10 "$secs" "$@" || rc=$?
    [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || echo "TIMED OUT after ${secs} s: $(basename "$1") ${2:-}" | tee -a "$out/timeouts.txt" >&3
    return "$rc"
}

status=0
echo "== CUDA tests"
limited 240 "$bin/cuda-tests" --nocapture --test-threads 1 > "$out/cuda-tests.log" 2>&1 || status=1
grep -E "^test |test result|SKIPPED|CUDA device|GPU:" "$out/cuda-tests.log" || true

echo "== ERSM stage benchmark"
limited 90 "$bin/ersm_stage" --json "$out/ersm_stage.json" | tee "$out/ersm_stage.txt" || status=1

echo "== ersm bench, energy layer on CUDA and on CPU"
limited 90 "$bin/ersm" bench --device cuda --frames 60 --json "$out/bench-cuda.json" > "$out/bench-cuda.txt" 2>&1 || status=1
limited 90 "$bin/ersm" bench --device cpu --frames 60 --json "$out/bench-cpu.json" > "$out/bench-cpu.txt" 2>&1 || status=1
tail -16 "$out/bench-cuda.txt"

# The same with each frame's suffix (sets, rulebooks, steps) captured once as
# a CUDA graph and replayed: the measurement that decides the default.
echo "== ersm bench on CUDA, the suffix replayed as one CUDA graph per frame (ERSM_CUDA_GRAPHS=1)"
limited 90 env ERSM_CUDA_GRAPHS=1 "$bin/ersm" bench --device cuda --frames 60 --json "$out/bench-cuda-graphs.json" \
    > "$out/bench-cuda-graphs.txt" 2>&1 || status=1
tail -16 "$out/bench-cuda-graphs.txt"

# The face package on CUDA, frame by frame and as a tracked stream (held
# tokens and gate shifts in the energy kernel and the suffix's kernels).
echo "== ersm bench on CUDA, the face package, frame by frame and --track"
limited 45 "$bin/ersm" bench --model models/centerface_ersm --device cuda --frames 60 \
    --json "$out/bench-cuda-faces.json" > "$out/bench-cuda-faces.txt" 2>&1 || status=1
limited 45 "$bin/ersm" bench --model models/centerface_ersm --device cuda --track --frames 60 \
    --json "$out/bench-cuda-faces-track.json" > "$out/bench-cuda-faces-track.txt" 2>&1 || status=1
grep -E "speedup|faces:|tracked" "$out/bench-cuda-faces.txt" "$out/bench-cuda-faces-track.txt" || true

echo "== where a GPU frame's time goes (each suffix op synchronised; device-built sets and rulebooks, host-built ones aside)"
limited 90 "$bin/ersm" bench --device cuda --frames 20 --profile > "$out/profile-cuda.txt" 2>&1 || status=1
sed -n '/where an ERSM/,/^$/p' "$out/profile-cuda.txt"
limited 90 env ERSM_CUDA_GRAPHS=1 "$bin/ersm" bench --device cuda --frames 20 --profile > "$out/profile-cuda-graphs.txt" 2>&1 || status=1
grep -E "aside: suffix untimed" "$out/profile-cuda-graphs.txt" || true

echo "== ersm on the GPU against ONNX Runtime's CUDA provider (where this machine's onnxruntime has one)"
limited 150 python3 targets/compare-ort.py --ersm "$bin/ersm" --device cuda --threads all --frames 60 --clip-frames 60 \
    --json "$out/compare-ort-cuda.json" > "$out/compare-ort-cuda.txt" 2>&1 || status=1
cat "$out/compare-ort-cuda.txt"

# A reference for the dense baseline where ORT's CUDA provider is missing; it
# leaves the status alone (a machine without torch has simply no reference).
echo "== ersm on the GPU against PyTorch's cuDNN path (eager, CUDA graph), where torch has CUDA"
limited 150 python3 targets/compare-torch.py --ersm "$bin/ersm" --device cuda --frames 60 \
    --json "$out/compare-torch-cuda.json" > "$out/compare-torch-cuda.txt" 2>&1 \
    || echo "compare-torch: no result, see compare-torch-cuda.txt"
cat "$out/compare-torch-cuda.txt"

# The GPU's own memory checker on the kernels' parity tests: out-of-bounds and
# misaligned accesses (memcheck; the emulator runs the kernels in host memory,
# where a read past a buffer can go unseen) and shared-memory races in the
# energy kernel (racecheck; the emulator cannot see those). Last, as it is the
# slowest step and leaves the status alone: its findings are in sanitizer-*.txt.
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1 || true)
sanitize() {
    local tool=$1 name=$2 rc=0
    shift 2
    local log="$out/sanitizer-$tool-$name.txt"
    limited 120 "$sanitizer" --tool "$tool" --error-exitcode 3 --print-limit 20 \
        "$bin/cuda-tests" --nocapture --test-threads 1 --exact "$@" > "$log" 2>&1 || rc=$?
    echo "$tool, $name kernels: $([ "$rc" -eq 0 ] && echo clean || echo "exit $rc, see $(basename "$log")")"
    grep -E "SUMMARY|test result|SKIPPED" "$log" || true
}
if [ -n "$sanitizer" ] && nvidia-smi -L >/dev/null 2>&1; then
    echo "== compute-sanitizer on the kernels' GPU tests"
    energy=(cuda_matches_cpu_exactly_on_kept_sets cuda_keeps_lowest_token_when_none_is_negative)
    sanitize memcheck energy "${energy[@]}"
    sanitize memcheck suffix suffix::gpu_suffix_matches_the_cpu_executor_on_a_real_gpu
    sanitize racecheck energy "${energy[@]}"
else
    echo "== compute-sanitizer: not run (${sanitizer:-not found}, or no GPU)"
fi

echo "== summary: status $status"
grep "test result" "$out/cuda-tests.log" || true
# Issue 15's end-to-end target, read from the benches' JSON, so the log's tail
# carries it even where the files do not come back.
for f in bench-cuda bench-cuda-graphs; do
    python3 - "$out/$f.json" <<'PY' || true
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    sys.exit(f"{sys.argv[1]}: no result ({e})")
t = {m: d["stages"][m]["total"]["p50_ms"] for m in ("ersm", "dense")}
print(f"{sys.argv[1].rsplit('/', 1)[-1]}: ERSM {t['ersm']:.3f} ms, dense {t['dense']:.3f} ms p50 end to end: "
      f"{d['speedup']:.2f}x (target 1.5x), suffix {d['suffix_speedup']:.2f}x, keep {d['keep_ratio']:.3f}, "
      f"agreement {d['agreement']:.3f}; {d['placement']}")
PY
done
exit $status
