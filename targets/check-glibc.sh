#!/usr/bin/env bash
# Fails when an aarch64 binary asks for a newer glibc symbol version than the
# device has:  targets/check-glibc.sh BINARY MAX_GLIBC
set -euo pipefail
bin="$1" max="$2"
need=$(aarch64-linux-gnu-objdump -T "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
if [ "$(printf '%s\n%s\n' "$need" "$max" | sort -V | tail -1)" != "$max" ]; then
  echo "error: $bin needs glibc $need but the device has $max" >&2
  exit 1
fi
echo "$bin needs glibc $need (device has $max)"
