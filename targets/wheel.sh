#!/usr/bin/env bash
# Builds the Python wheel (abi3: one wheel for CPython 3.9+) with the bundled
# models inside, into dist/:
#   targets/wheel.sh           # this machine (x86_64), manylinux tag of its glibc
#   targets/wheel.sh orin      # Jetson Orin, JetPack 6: aarch64, glibc 2.35
#   targets/wheel.sh xavier    # Jetson Xavier, JetPack 5: aarch64, glibc 2.31 (zig)
# Cross builds need targets/setup-cross.sh (and --zig for xavier) first.
# maturin comes from PyPI into target/maturin (a build tool only: the wheel
# needs nothing but numpy to run). `pip install ./python` builds and
# installs in one step without this script, reading the models from the
# repository instead.
set -euo pipefail
cd "$(dirname "$0")/.."
MATURIN_VERSION=1.16.0
profile="${1:-}"
tools="$PWD/target/maturin"
if [ ! -x "$tools/bin/maturin" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$tools" "maturin==$MATURIN_VERSION"
fi
maturin=(env PYTHONPATH="$tools" "$tools/bin/maturin")
args=(build --release --strip -m python/Cargo.toml -o dist)
if [ -n "$profile" ]; then
  if [ ! -f "targets/$profile.profile" ]; then
    echo "usage: targets/wheel.sh [PROFILE]   (profiles: $(cd targets && ls ./*.profile | sed 's|^\./||; s/.profile//' | tr '\n' ' '))" >&2
    exit 2
  fi
  # shellcheck source=/dev/null
  . "targets/$profile.profile"
  args+=(--target "$RUST_TARGET" --no-default-features --features "$CUDA_FEATURE"
    --compatibility "manylinux_${MAX_GLIBC/./_}")
  if [ -n "${ZIG_GLIBC:-}" ]; then
    export PATH="$PWD/target/cross-tools/ziglang:$PATH"
    args+=(--zig)
  fi
  echo "== $PROFILE_NAME: $RUST_TARGET, --features $CUDA_FEATURE, glibc <= $MAX_GLIBC"
fi
# The models travel inside the package (ersm/models, found by ersm/__init__.py);
# the copy is removed however the build ends.
rm -rf python/ersm/models
cp -r models python/ersm/models
trap 'rm -rf python/ersm/models' EXIT
"${maturin[@]}" "${args[@]}"
ls -l dist/*.whl
