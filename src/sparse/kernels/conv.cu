// Convs on token rows: 1×1 stride-1, any other conv through the rulebook
// (k×k, strided, grouped), and depthwise. GPU twins of
// src/sparse/ops/conv.rs (`ConvParams`) and depthwise.rs (`DepthwiseParams`).

struct ConvParams {
    const float* x;     // input rows (rows_in × cin)
    const float* res;   // residual added after the activation, laid out as y (null: none)
    const float* w;     // weights: cin × cout (1×1), or per group (taps · cin/g) × cout/g
    const float* bias;
    const u32* rb;      // rulebook: rows × taps input-row indices (null for 1×1)
    const float* fill;  // the input's fill vector, read at dropped taps (null: zero)
    float* y;           // output rows (rows × cout)
    const u32* count;   // output rows in device memory
    int rows;           // output rows the launch can hold
    int cin, cout, groups, taps;
    SfxAct act;
};

// 1×1 stride-1 conv on token rows: y[r, o] = act(bias[o] + Σ_i x[r, i] w[i, o]).
extern "C" __global__ void sfx_conv1x1(ConvParams p) {
    const int idx = sfx_index();
    if (idx >= sfx_rows(p.count, p.rows) * p.cout) return;
    const int r = idx / p.cout, o = idx % p.cout;
    const float* xr = p.x + (long)r * p.cin;
    float acc = p.bias[o];
    for (int i = 0; i < p.cin; ++i) acc += xr[i] * p.w[(long)i * p.cout + o];
    p.y[idx] = sfx_conv_out(acc, p.act, p.res, idx);
}

// Any other conv (k×k, strided, grouped) through the rulebook. Weights per
// group are (taps · cin/g) × cout/g, tap-major, groups one after another.
extern "C" __global__ void sfx_conv_rulebook(ConvParams p) {
    const int idx = sfx_index();
    if (idx >= sfx_rows(p.count, p.rows) * p.cout) return;
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
    p.y[idx] = sfx_conv_out(acc, p.act, p.res, idx);
}

struct DepthwiseParams {
    const float* x;          // input rows (rows_in × c)
    const float* res;        // residual added after the activation (null: none)
    const float* w;          // weights, taps × c, tap-major
    const float* bias;
    const u32* rb;           // rulebook: rows × taps input-row indices
    const float* fill_taps;  // taps × c: each tap's weights times the input's fill (null: zero)
    float* y;                // output rows (rows × c)
    const u32* count;        // output rows in device memory
    int rows;                // output rows the launch can hold
    int c, taps;
    SfxAct act;
};

// Depthwise conv through the rulebook.
extern "C" __global__ void sfx_depthwise(DepthwiseParams p) {
    const int idx = sfx_index();
    if (idx >= sfx_rows(p.count, p.rows) * p.c) return;
    const int r = idx / p.c, c = idx % p.c;
    const u32* taps = p.rb + (long)r * p.taps;
    float acc = p.bias[c];
    for (int t = 0; t < p.taps; ++t) {
        const u32 src = taps[t];
        if (src < SFX_DROPPED) acc += p.x[(long)src * p.c + c] * p.w[(long)t * p.c + c];
        else if (src == SFX_DROPPED && p.fill_taps) acc += p.fill_taps[(long)t * p.c + c];
    }
    p.y[idx] = sfx_conv_out(acc, p.act, p.res, idx);
}
