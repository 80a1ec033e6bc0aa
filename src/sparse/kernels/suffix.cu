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
    const float* x2;     // second operand of a binary op; a conv's residual (null: none)
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
    // Token sets and rulebooks built on the device (sfx_level0, sfx_level, sfx_rulebook):
    const u32* set_in;   // an index map (raster position -> token number or SFX_INACTIVE):
                         // the parent level's, or the rulebook's input level's
    const u32* list_in;  // a token list (raster indices, ascending): the energy kernel's kept
                         // tokens, the parent level's, or the rulebook's output level's
    const u32* count_in; // tokens in list_in
    u32* set_out;        // the index map written, or the rulebook table
    u32* list_out;       // the token list written
    u32* count_out;      // its length
    int map_h, map_w;    // this level's map, or the rulebook's output level's
    int in_h, in_w;      // the parent level's map, or the rulebook's input level's
    int stride;          // from the parent, or the window's
    int rule;            // stride rule: 0 any, 1 centre (src/sparse/tokens.rs)
    int kh, kw;          // window
    int pad_top, pad_left;
    // Token counts left in device memory: when set, the rows are *count (at most
    // `rows`, the launch's capacity), and an elementwise op over token rows covers
    // *count × row_len values (at most n). So a frame's launches need no count
    // from the host, and are the same every frame.
    const u32* count;
    int row_len;         // values per token row, with count
};

// Output rows of this launch: the device count when there is one.
__device__ __forceinline__ int sfx_rows(const SfxParams& p) {
    if (!p.count) return p.rows;
    const u32 c = *p.count;
    return c < (u32)p.rows ? (int)c : p.rows;
}

// Values an elementwise launch covers: the device count's rows when there is one.
__device__ __forceinline__ int sfx_len(const SfxParams& p) {
    if (!p.count) return p.n;
    const long long v = (long long)*p.count * p.row_len;
    return v < (long long)p.n ? (int)v : p.n;
}

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

// A conv's output value: its activation, then the residual add of the graph's
// next node fused in (x2 holds rows laid out as y), so the sum is not a
// launch and a pass over memory of its own. Rounded as the two ops round.
__device__ __forceinline__ float sfx_conv_out(const SfxParams& p, float acc, int idx) {
    const float v = sfx_act(acc, p.act, p.a0, p.a1);
    return p.x2 ? v + p.x2[idx] : v;
}

__device__ __forceinline__ int sfx_index() {
    return (int)(blockIdx.x * blockDim.x + threadIdx.x);
}

// 1×1 stride-1 conv on token rows: y[r, o] = act(bias[o] + Σ_i x[r, i] w[i, o]).
extern "C" __global__ void sfx_conv1x1(SfxParams p) {
    const int idx = sfx_index();
    if (idx >= sfx_rows(p) * p.cout) return;
    const int r = idx / p.cout, o = idx % p.cout;
    const float* xr = p.x + (long)r * p.cin;
    float acc = p.bias[o];
    for (int i = 0; i < p.cin; ++i) acc += xr[i] * p.w[(long)i * p.cout + o];
    p.y[idx] = sfx_conv_out(p, acc, idx);
}

// Any other conv (k×k, strided, grouped) through the rulebook. Weights per
// group are (taps · cin/g) × cout/g, tap-major, groups one after another.
extern "C" __global__ void sfx_conv_rulebook(SfxParams p) {
    const int idx = sfx_index();
    if (idx >= sfx_rows(p) * p.cout) return;
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
    p.y[idx] = sfx_conv_out(p, acc, idx);
}

// Depthwise conv through the rulebook; weights taps × c, tap-major.
extern "C" __global__ void sfx_depthwise(SfxParams p) {
    const int idx = sfx_index();
    if (idx >= sfx_rows(p) * p.cout) return;
    const int r = idx / p.cout, c = idx % p.cout;
    const u32* taps = p.rb + (long)r * p.taps;
    float acc = p.bias[c];
    for (int t = 0; t < p.taps; ++t) {
        const u32 src = taps[t];
        if (src < SFX_DROPPED) acc += p.x[(long)src * p.cout + c] * p.w[(long)t * p.cout + c];
        else if (src == SFX_DROPPED && p.fill) acc += p.fill[(long)t * p.cout + c];
    }
    p.y[idx] = sfx_conv_out(p, acc, idx);
}

// y = x ∘ x2 elementwise; x2 holds either n values or one per channel
// (cout of them, `inner` consecutive values of x per channel).
extern "C" __global__ void sfx_binary(SfxParams p) {
    const int idx = sfx_index();
    if (idx >= sfx_len(p)) return;
    const float b = p.cout > 0 ? p.x2[(idx / p.inner) % p.cout] : p.x2[idx];
    const float a = p.x[idx];
    p.y[idx] = p.kind == 0 ? a + b : a * b;
}

// y = x · scale[ch] + shift[ch] (scale in w, shift in bias).
extern "C" __global__ void sfx_affine(SfxParams p) {
    const int idx = sfx_index();
    if (idx >= sfx_len(p)) return;
    const int ch = (idx / p.inner) % p.cout;
    p.y[idx] = p.x[idx] * p.w[ch] + p.bias[ch];
}

// A lone activation.
extern "C" __global__ void sfx_activation(SfxParams p) {
    const int idx = sfx_index();
    if (idx >= sfx_len(p)) return;
    p.y[idx] = sfx_act(p.x[idx], p.act, p.a0, p.a1);
}

// Global mean: one thread per channel, rows in order, then one multiply by
// the reciprocal (as the CPU executor does). Over the active tokens, or with
// a fill over all n positions, the dropped ones holding the fill.
extern "C" __global__ void sfx_global_mean(SfxParams p) {
    const int c = sfx_index();
    if (c >= p.cout) return;
    const int rows = sfx_rows(p);
    float s = 0.0f;
    for (int r = 0; r < rows; ++r) s += p.x[(long)r * p.cout + c];
    if (p.fill) {
        const int dropped = p.n > rows ? p.n - rows : 0;
        s += (float)dropped * p.fill[c];
        p.y[c] = s * (1.0f / (float)(p.n > 1 ? p.n : 1));
    } else {
        p.y[c] = s * (1.0f / (float)(rows > 1 ? rows : 1));
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

// ---- Token sets and rulebooks on the device (src/sparse/plan.rs, tokens.rs, rulebook.rs) ----
// Each thread owns one output value and finds its rank by counting, so the
// sets come out in raster order without a scan, a barrier or an atomic.

// Level 0 from the energy kernel's kept list (ascending): one thread per map
// position finds its token number by binary search; the list is copied.
extern "C" __global__ void sfx_level0(SfxParams p) {
    const int i = sfx_index();
    const int hw = p.map_h * p.map_w;
    if (i >= hw) return;
    const int n = (int)*p.count_in < hw ? (int)*p.count_in : hw;
    int lo = 0, hi = n;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (p.list_in[mid] < (u32)i) lo = mid + 1; else hi = mid;
    }
    p.set_out[i] = lo < n && p.list_in[lo] == (u32)i ? (u32)lo : SFX_INACTIVE;
    if (i < n) p.list_out[i] = p.list_in[i];
    // The count as given: one past the map is the host's error to report.
    if (i == 0) *p.count_out = *p.count_in;
}

// Whether output (oy, ox) of a stride-s level is active under the rule.
__device__ __forceinline__ bool sfx_strided_active(const SfxParams& p, int oy, int ox) {
    const int s = p.stride;
    if (p.rule == 1) {
        const int y = s * oy, x = s * ox;
        return y < p.in_h && x < p.in_w && p.set_in[y * p.in_w + x] != SFX_INACTIVE;
    }
    for (int y = s * oy; y < s * oy + s && y < p.in_h; ++y)
        for (int x = s * ox; x < s * ox + s && x < p.in_w; ++x)
            if (p.set_in[y * p.in_w + x] != SFX_INACTIVE) return true;
    return false;
}

// A strided level from its parent: one thread per position counts the active
// positions before it (its token number) and in all (the level's size). With
// none active, the position over the parent's first token is, so a level is
// never empty (TokenSet::downsample).
extern "C" __global__ void sfx_level(SfxParams p) {
    const int q = sfx_index();
    const int hw = p.map_h * p.map_w;
    if (q >= hw) return;
    u32 before = 0, total = 0;
    for (int j = 0; j < hw; ++j) {
        const u32 a = sfx_strided_active(p, j / p.map_w, j % p.map_w) ? 1u : 0u;
        before += j < q ? a : 0u;
        total += a;
    }
    bool active = sfx_strided_active(p, q / p.map_w, q % p.map_w);
    if (total == 0 && *p.count_in > 0) {
        const int first = (int)p.list_in[0];
        int oy = first / p.in_w / p.stride, ox = first % p.in_w / p.stride;
        oy = oy < p.map_h - 1 ? oy : p.map_h - 1;
        ox = ox < p.map_w - 1 ? ox : p.map_w - 1;
        active = q == oy * p.map_w + ox;
        before = 0;
        total = 1;
    }
    p.set_out[q] = active ? before : SFX_INACTIVE;
    if (active) p.list_out[before] = (u32)q;
    if (q == 0) *p.count_out = total;
}

// A rulebook: one thread per (output token, tap), as Rulebook::build. Launched
// for every position of the output level; threads past its count return.
extern "C" __global__ void sfx_rulebook(SfxParams p) {
    const int idx = sfx_index();
    const int taps = p.kh * p.kw;
    const int r = idx / taps, t = idx % taps;
    if (r >= p.map_h * p.map_w || r >= (int)*p.count_in) return;
    const int o = (int)p.list_in[r];
    const int y = (o / p.map_w) * p.stride - p.pad_top + t / p.kw;
    const int x = (o % p.map_w) * p.stride - p.pad_left + t % p.kw;
    u32 v = SFX_INACTIVE;
    if (y >= 0 && x >= 0 && y < p.in_h && x < p.in_w) {
        const u32 i = p.set_in[y * p.in_w + x];
        v = i == SFX_INACTIVE ? SFX_DROPPED : i;
    }
    p.set_out[idx] = v;
}
