# Jetson Xavier (AGX Xavier, Xavier NX): JetPack 5 (L4T r35, Ubuntu 20.04,
# glibc 2.31), CUDA 11.4, GPU sm_72, CPU NVIDIA Carmel (ARMv8.2). Sourced by build.sh.
PROFILE_NAME="Jetson Xavier (JetPack 5)"
RUST_TARGET=aarch64-unknown-linux-gnu
LINKER=aarch64-linux-gnu-gcc
CUDA_FEATURE=cuda-11040
CUDA_ARCH=sm_72
# JetPack 5's glibc is 2.31, older than this build machine's cross glibc (2.36):
# build.sh refuses a binary that needs more. Build natively on the device
# (README "Building on the device") until an older-glibc sysroot is added.
MAX_GLIBC=2.31
POWER_MODE="sudo nvpmodel -m 0   # MAXN"
CLOCKS="sudo jetson_clocks"
THREADS=1
