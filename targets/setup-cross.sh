#!/usr/bin/env bash
# Installs what cross-building for Jetson needs on a Debian/Ubuntu x86_64
# machine: the Rust aarch64 standard library, the GNU cross compilers (C for
# the linker, C++ for openh264), the arm64 C library, and user-mode qemu to
# run the result here.
set -euo pipefail
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
