// What every suffix kernel family shares: the rulebook markers, the token
// count read in device memory, the activation code, the thread index.
//
// NVRTC compiles each family as common.cuh followed by the family's file
// (src/sparse/gpu/kernel.rs joins them); the tests join every family into
// one C++ file, hence the guard.
//
// Each kernel computes one output value per thread with a fixed summation
// order, so results do not depend on the launch shape. No shared memory, no
// barriers and no atomics: that keeps the kernels plain enough to be
// compiled for the CPU too (tests/cuda/suffix.rs builds them with a C++
// compiler and runs the whole GPU executor on them where no GPU is present).
// Faster tilings come once a GPU measures them.
//
// Compiled with --fmad=false, like the energy kernel: every product and sum
// rounds on its own, as the CPU executor's scalar paths do.
//
// Every kernel takes one parameter struct by value, mirrored field for field
// by a `#[repr(C)]` struct in the Rust file of the op it computes.

#ifndef SFX_COMMON_CUH
#define SFX_COMMON_CUH

#ifndef SFX_HOST_EMULATION
typedef unsigned int u32;
#endif

// Rulebook entries that are not input rows: a tap outside the map (padding,
// reads zero), and a tap on a dropped position inside it (reads the input's
// fill vector when the op has one, else zero). As src/sparse/tokens.rs.
#define SFX_INACTIVE 0xffffffffu
#define SFX_DROPPED 0xfffffffeu

// An activation as src/sparse/ops/activation.rs encodes it (`GpuAct`):
// 0 none, 1 relu, 2 clip (a0, a1 = lo, hi), 3 sigmoid, 4 hard sigmoid
// (a0, a1 = alpha, beta), 5 hard swish.
struct SfxAct {
    int code;
    float a0, a1;
};

__device__ __forceinline__ float sfx_act(float v, SfxAct a) {
    switch (a.code) {
    case 1: return fmaxf(v, 0.0f);
    case 2: return fminf(fmaxf(v, a.a0), a.a1);
    case 3: return 1.0f / (1.0f + expf(-v));
    case 4: return fminf(fmaxf(a.a0 * v + a.a1, 0.0f), 1.0f);
    case 5: return v * fminf(fmaxf(v / 6.0f + 0.5f, 0.0f), 1.0f);
    default: return v;
    }
}

__device__ __forceinline__ int sfx_index() {
    return (int)(blockIdx.x * blockDim.x + threadIdx.x);
}

// Token counts stay in device memory: a launch is sized for its level's
// capacity (`rows`, every position) and covers the level's count, so a
// frame's launches need no count from the host and are the same every frame.

// Output rows of a launch: the device count (null: none) clamped to `rows`.
__device__ __forceinline__ int sfx_rows(const u32* count, int rows) {
    if (!count) return rows;
    const u32 c = *count;
    return c < (u32)rows ? (int)c : rows;
}

// Values an elementwise launch covers: the count's rows of `row_len` values
// (null count: all `n`), at most `n`.
__device__ __forceinline__ int sfx_len(const u32* count, int row_len, int n) {
    if (!count) return n;
    const long long v = (long long)*count * row_len;
    return v < (long long)n ? (int)v : n;
}

// A conv's output value: its activation, then the residual add of the
// graph's next node fused in (`res` holds rows laid out as the output), so
// the sum is not a launch and a pass over memory of its own. Rounded as the
// two ops round.
__device__ __forceinline__ float sfx_conv_out(float acc, SfxAct a, const float* res, int idx) {
    const float v = sfx_act(acc, a);
    return res ? v + res[idx] : v;
}

#endif
