// The sparse suffix on the GPU: every op of the CPU sparse executor
// (src/sparse/ops) as a kernel over gathered token rows.
//
// Each kernel takes the same parameter block by value and computes one output
// value per thread with a fixed summation order, so results do not depend on
// the launch shape. No shared memory, no barriers and no atomics: that keeps
// the kernels plain enough to be compiled for the CPU too (tests/suffix_kernels
// builds this file with a C++ compiler and runs the whole GPU executor on it
// where no GPU is present). Faster tilings come once a GPU measures them.
//
// Compiled with --fmad=false, like the energy kernel: every product and sum
// rounds on its own, as the CPU executor's scalar paths do.

#ifndef SFX_HOST_EMULATION
typedef unsigned int u32;
#endif

// Rulebook entries that are not input rows: a tap outside the map (padding,
// reads zero), and a tap on a dropped position inside it (reads the input's
// fill vector when the op has one, else zero). As src/sparse/tokens.rs.
#define SFX_INACTIVE 0xffffffffu
#define SFX_DROPPED 0xfffffffeu

struct SfxParams {
    const float* x;      // input rows (rows_in × cin), or a dense vector
    const float* x2;     // second operand of a binary op
    const float* w;      // weights
    const float* bias;   // bias, or the shift of an affine op
    const u32* rb;       // rulebook: rows × taps input-row indices
    const float* fill;   // what a dropped position holds (null: zero); conv: the input's
                         // fill vector; depthwise: taps × c tap weights times it;
                         // global mean: the fill vector, over n positions
    float* y;            // output
    int rows;            // output rows (tokens); 1 for dense values
    int cin;             // input channels (row length of x)
    int cout;            // output channels (row length of y)
    int groups;          // conv groups
    int taps;            // kernel taps (kh × kw)
    int act;             // fused activation: 0 none, 1 relu, 2 clip, 3 sigmoid, 4 hard sigmoid, 5 hard swish
    float a0, a1;        // activation parameters (clip lo/hi, hard sigmoid alpha/beta)
    int kind;            // binary op: 0 add, 1 mul
    int n;               // elements of an elementwise op
    int inner;           // elementwise: consecutive values sharing a channel (1 for token rows)
};

__device__ __forceinline__ float sfx_act(float v, int act, float a0, float a1) {
    switch (act) {
    case 1: return fmaxf(v, 0.0f);
    case 2: return fminf(fmaxf(v, a0), a1);
    case 3: return 1.0f / (1.0f + expf(-v));
    case 4: return fminf(fmaxf(a0 * v + a1, 0.0f), 1.0f);
    case 5: return v * fminf(fmaxf(v / 6.0f + 0.5f, 0.0f), 1.0f);
    default: return v;
    }
}

__device__ __forceinline__ int sfx_index() {
    return (int)(blockIdx.x * blockDim.x + threadIdx.x);
}

// 1×1 stride-1 conv on token rows: y[r, o] = act(bias[o] + Σ_i x[r, i] w[i, o]).
extern "C" __global__ void sfx_conv1x1(SfxParams p) {
    const int idx = sfx_index();
    if (idx >= p.rows * p.cout) return;
    const int r = idx / p.cout, o = idx % p.cout;
    const float* xr = p.x + (long)r * p.cin;
    float acc = p.bias[o];
    for (int i = 0; i < p.cin; ++i) acc += xr[i] * p.w[(long)i * p.cout + o];
    p.y[idx] = sfx_act(acc, p.act, p.a0, p.a1);
}

// Any other conv (k×k, strided, grouped) through the rulebook. Weights per
// group are (taps · cin/g) × cout/g, tap-major, groups one after another.
extern "C" __global__ void sfx_conv_rulebook(SfxParams p) {
    const int idx = sfx_index();
    if (idx >= p.rows * p.cout) return;
    const int r = idx / p.cout, o = idx % p.cout;
    const int cin_g = p.cin / p.groups, cout_g = p.cout / p.groups;
    const int g = o / cout_g, og = o % cout_g;
    const float* wg = p.w + (long)g * p.taps * cin_g * cout_g;
    const u32* taps = p.rb + (long)r * p.taps;
    float acc = p.bias[o];
    for (int t = 0; t < p.taps; ++t) {
        const u32 src = taps[t];
        const float* xs;
        if (src < SFX_DROPPED) xs = p.x + (long)src * p.cin + g * cin_g;
        else if (src == SFX_DROPPED && p.fill) xs = p.fill + g * cin_g;
        else continue;
        const float* wt = wg + (long)t * cin_g * cout_g + og;
        for (int i = 0; i < cin_g; ++i) acc += xs[i] * wt[(long)i * cout_g];
    }
    p.y[idx] = sfx_act(acc, p.act, p.a0, p.a1);
}

// Depthwise conv through the rulebook; weights taps × c, tap-major.
extern "C" __global__ void sfx_depthwise(SfxParams p) {
    const int idx = sfx_index();
    if (idx >= p.rows * p.cout) return;
    const int r = idx / p.cout, c = idx % p.cout;
    const u32* taps = p.rb + (long)r * p.taps;
    float acc = p.bias[c];
    for (int t = 0; t < p.taps; ++t) {
        const u32 src = taps[t];
        if (src < SFX_DROPPED) acc += p.x[(long)src * p.cout + c] * p.w[(long)t * p.cout + c];
        else if (src == SFX_DROPPED && p.fill) acc += p.fill[(long)t * p.cout + c];
    }
    p.y[idx] = sfx_act(acc, p.act, p.a0, p.a1);
}

// y = x ∘ x2 elementwise; x2 holds either n values or one per channel
// (cout of them, `inner` consecutive values of x per channel).
extern "C" __global__ void sfx_binary(SfxParams p) {
    const int idx = sfx_index();
    if (idx >= p.n) return;
    const float b = p.cout > 0 ? p.x2[(idx / p.inner) % p.cout] : p.x2[idx];
    const float a = p.x[idx];
    p.y[idx] = p.kind == 0 ? a + b : a * b;
}

// y = x · scale[ch] + shift[ch] (scale in w, shift in bias).
extern "C" __global__ void sfx_affine(SfxParams p) {
    const int idx = sfx_index();
    if (idx >= p.n) return;
    const int ch = (idx / p.inner) % p.cout;
    p.y[idx] = p.x[idx] * p.w[ch] + p.bias[ch];
}

// A lone activation.
extern "C" __global__ void sfx_activation(SfxParams p) {
    const int idx = sfx_index();
    if (idx >= p.n) return;
    p.y[idx] = sfx_act(p.x[idx], p.act, p.a0, p.a1);
}

// Global mean: one thread per channel, rows in order, then one multiply by
// the reciprocal (as the CPU executor does). Over the active tokens, or with
// a fill over all n positions, the dropped ones holding the fill.
extern "C" __global__ void sfx_global_mean(SfxParams p) {
    const int c = sfx_index();
    if (c >= p.cout) return;
    float s = 0.0f;
    for (int r = 0; r < p.rows; ++r) s += p.x[(long)r * p.cout + c];
    if (p.fill) {
        const int dropped = p.n > p.rows ? p.n - p.rows : 0;
        s += (float)dropped * p.fill[c];
        p.y[c] = s * (1.0f / (float)(p.n > 1 ? p.n : 1));
    } else {
        p.y[c] = s * (1.0f / (float)(p.rows > 1 ? p.rows : 1));
    }
}

// y = act(bias + x · W) on a dense vector; W is cin × cout, so neighbouring
// threads read neighbouring weights.
extern "C" __global__ void sfx_linear(SfxParams p) {
    const int o = sfx_index();
    if (o >= p.cout) return;
    float acc = p.bias[o];
    for (int i = 0; i < p.cin; ++i) acc += p.x[i] * p.w[(long)i * p.cout + o];
    p.y[o] = sfx_act(acc, p.act, p.a0, p.a1);
}
