# Jetson Xavier (AGX Xavier, Xavier NX): JetPack 5 (L4T r35, Ubuntu 20.04,
# glibc 2.31), CUDA 11.4, GPU sm_72, CPU NVIDIA Carmel (ARMv8.2). Sourced by build.sh.
PROFILE_NAME="Jetson Xavier (JetPack 5)"
RUST_TARGET=aarch64-unknown-linux-gnu
LINKER="zig cc (cargo-zigbuild)"
CUDA_FEATURE=cuda-11040
CUDA_ARCH=sm_72
# JetPack 5's glibc (2.31) is older than the Debian cross toolchain's (2.36),
# so this profile links with zig against glibc 2.31 symbols, and C++ (openh264)
# against zig's static libc++: `targets/setup-cross.sh --zig` installs both.
MAX_GLIBC=2.31
ZIG_GLIBC=2.31
POWER_MODE="sudo nvpmodel -m 0   # MAXN"
CLOCKS="sudo jetson_clocks"
THREADS=1
