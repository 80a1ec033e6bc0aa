# Jetson Thor (AGX Thor, T5000/T4000): JetPack 7 (L4T r38, Ubuntu 24.04,
# glibc 2.39), CUDA 13.0, GPU sm_110, CPU Neoverse-V3AE. Sourced by build.sh.
PROFILE_NAME="Jetson Thor (JetPack 7)"
RUST_TARGET=aarch64-unknown-linux-gnu
LINKER=aarch64-linux-gnu-gcc
# cudarc's CUDA API level: JetPack 7 ships CUDA 13, whose libraries are .so.13.
CUDA_FEATURE=cuda-13000
CUDA_ARCH=sm_110
# Newest glibc symbol version the binary may need (the device's glibc).
MAX_GLIBC=2.39
# Run settings for stable latency figures (see targets/README.md).
POWER_MODE="sudo nvpmodel -m 0   # MAXN"
CLOCKS="sudo jetson_clocks       # pin CPU/GPU/EMC clocks at their maximum"
THREADS=1
