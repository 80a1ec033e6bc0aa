#!/usr/bin/env bash
# Cross-builds the release binary for a device profile:
#   targets/build.sh orin      # -> target/aarch64-unknown-linux-gnu/release/ersm
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
cargo build --release --target "$RUST_TARGET" --no-default-features --features "$CUDA_FEATURE"
bin="target/$RUST_TARGET/release/ersm"
# The device's glibc must provide every symbol version the binary asks for.
need=$(aarch64-linux-gnu-objdump -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
if [ "$(printf '%s\n%s\n' "$need" "$MAX_GLIBC" | sort -V | tail -1)" != "$MAX_GLIBC" ]; then
  echo "error: $bin needs glibc $need but $PROFILE_NAME has $MAX_GLIBC; build on the device instead (README: Building on the device)" >&2
  exit 1
fi
echo "== built $bin (needs glibc $need, device has $MAX_GLIBC)"
