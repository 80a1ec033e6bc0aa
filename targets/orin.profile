# Jetson Orin (AGX Orin, Orin NX, Orin Nano): JetPack 6 (L4T r36, Ubuntu 22.04,
# glibc 2.35), CUDA 12.2+, GPU sm_87, CPU Cortex-A78AE. Sourced by build.sh.
PROFILE_NAME="Jetson Orin (JetPack 6)"
RUST_TARGET=aarch64-unknown-linux-gnu
LINKER=aarch64-linux-gnu-gcc
# cudarc's CUDA API level: the oldest CUDA the binary must load (JetPack 6.0 ships 12.2).
CUDA_FEATURE=cuda-12020
CUDA_ARCH=sm_87
# Newest glibc symbol version the binary may need (the device's glibc).
MAX_GLIBC=2.35
# Run settings for stable latency figures (see targets/README.md).
POWER_MODE="sudo nvpmodel -m 0   # MAXN"
CLOCKS="sudo jetson_clocks       # pin CPU/GPU/EMC clocks at their maximum"
THREADS=1
