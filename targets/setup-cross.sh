#!/usr/bin/env bash
# Installs what cross-building for Jetson needs on a Debian/Ubuntu x86_64
# machine: the Rust aarch64 standard library, the GNU cross compilers (C for
# the linker, C++ for openh264), the arm64 C library, and user-mode qemu to
# run the result here. With --zig, also zig (PyPI `ziglang`) and
# cargo-zigbuild under target/cross-tools, for profiles that need an older
# glibc than the cross toolchain's (xavier).
set -euo pipefail
cd "$(dirname "$0")/.."
ZIGLANG_VERSION=0.17.1
ZIGBUILD_VERSION=0.24.1
rustup target add aarch64-unknown-linux-gnu
if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
pkgs="gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
aarch64-linux-gnu-gcc --version | head -1
qemu-aarch64 --version | head -1
if [ "${1:-}" = "--zig" ]; then
  tools="$PWD/target/cross-tools"
  if [ ! -x "$tools/ziglang/zig" ]; then
    python3 -m pip install --quiet --disable-pip-version-check --target "$tools" "ziglang==$ZIGLANG_VERSION"
  fi
  if [ ! -x "$tools/bin/cargo-zigbuild" ]; then
    cargo install --quiet --locked --root "$tools" cargo-zigbuild --version "$ZIGBUILD_VERSION"
  fi
  echo "zig $("$tools/ziglang/zig" version), $("$tools/bin/cargo-zigbuild" --version)"
fi
