#!/usr/bin/env bash
# Cross-builds the release binary for a device profile:
#   targets/build.sh orin      # -> target/aarch64-unknown-linux-gnu/release/ersm
#   targets/build.sh xavier    # -> target/zig-2.31/aarch64-unknown-linux-gnu/release/ersm
# The linker, the C/C++ cross compilers and the qemu runner come from
# .cargo/config.toml; targets/setup-cross.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
profile="${1:-}"
if [ -z "$profile" ] || [ ! -f "targets/$profile.profile" ]; then
  echo "usage: targets/build.sh PROFILE   (profiles: $(cd targets && ls *.profile | sed 's/.profile//' | tr '\n' ' '))" >&2
  exit 2
fi
# shellcheck source=/dev/null
. "targets/$profile.profile"
echo "== $PROFILE_NAME: $RUST_TARGET, --features $CUDA_FEATURE (GPU $CUDA_ARCH)"
if [ -n "${ZIG_GLIBC:-}" ]; then
  tools="$PWD/target/cross-tools"
  if [ ! -x "$tools/bin/cargo-zigbuild" ] || [ ! -x "$tools/ziglang/zig" ]; then
    echo "error: the $profile profile links with zig: run targets/setup-cross.sh --zig first" >&2
    exit 1
  fi
  # A separate target folder: the zig-linked build must not mix with the GNU one.
  PATH="$tools/bin:$tools/ziglang:$PATH" cargo zigbuild --release --target "$RUST_TARGET.$ZIG_GLIBC" \
    --target-dir "target/zig-$ZIG_GLIBC" --no-default-features --features "$CUDA_FEATURE"
  bin="target/zig-$ZIG_GLIBC/$RUST_TARGET/release/ersm"
else
  cargo build --release --target "$RUST_TARGET" --no-default-features --features "$CUDA_FEATURE"
  bin="target/$RUST_TARGET/release/ersm"
fi
# The device's glibc must provide every symbol version the binary asks for.
targets/check-glibc.sh "$bin" "$MAX_GLIBC"
echo "== built $bin (strip it before copying: aarch64-linux-gnu-strip -o ersm $bin)"
