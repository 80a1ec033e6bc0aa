// A gate (a second energy layer inside the suffix), the GPU twin of
// src/sparse/ops/gate.rs: its input rows scattered to the whole map, the
// energy layer's head on it (unary_head.cu's device functions, which the
// host prepends), the mean field one launch per step, then the gate's
// level (sfx_level's rule 4 in tokens.cu) and its rows. Each thread owns one
// output value: no shared memory, barrier or atomic.

struct GateMapParams {
    const float* x;       // the input's token rows (count × c)
    const u32* set_in;    // the input level's index map
    const float* fill;    // the input's fill vector (c values), or null: zero
    float* map;           // c × positions, NCHW
    int c, positions;
};

// The input as the sparse run holds it: its rows at active positions, its
// fill (or zero) elsewhere. One thread per (channel, position).
extern "C" __global__ void sfx_gate_map(GateMapParams p) {
    const int i = sfx_index();
    if (i >= p.c * p.positions) return;
    const int ch = i / p.positions, pos = i % p.positions;
    const u32 n = p.set_in[pos];
    p.map[i] = n != SFX_INACTIVE ? p.x[(size_t)n * p.c + ch] : (p.fill ? p.fill[ch] : 0.0f);
}

struct GateConvParams {
    const float* in;
    const float* w;
    const float* b;
    float* out;
    int cin, h, w_, cout, k, dil, groups, relu;
};

// One conv layer of the head over the whole map, one output per thread.
extern "C" __global__ void sfx_gate_conv(GateConvParams p) {
    const int n = p.cout * p.h * p.w_;
    const int i = sfx_index();
    if (i >= n) return;
    ersm_head_conv(p.in, p.cin, p.h, p.w_, p.w, p.b, p.cout, p.k, p.dil, p.groups, p.relu, p.out,
                   i, n);
}

struct GateUnaryParams {
    const float* hx;      // the head's last features (hc × positions), or the map
    const float* params;  // the per-token head: linear (hidden 0) or two-layer
    float* unary;         // positions
    float* energies;      // positions: the unary costs, before any mean-field step
    float* pull;          // positions: each token's pull on its neighbours
    const float* shift;   // one value the unary costs move by (a stream's offset), or null
    int hc, positions, hidden;
    float tau;
};

// Unary costs, one token per thread, as ersm.cu's ersm_unary, moved by the
// frame's shift (Gate::keeps).
extern "C" __global__ void sfx_gate_unary(GateUnaryParams p) {
    const int i = sfx_index();
    if (i >= p.positions) return;
    const float u = ersm_unary_cost(p.hx, p.hc, p.positions, i, p.params, p.hidden) +
                    (p.shift ? *p.shift : 0.0f);
    p.unary[i] = u;
    p.energies[i] = u;
    p.pull[i] = 1.0f - 2.0f * (1.0f / (1.0f + expf(u / p.tau)));
}

struct GateFieldParams {
    const float* unary;
    float* energies;
    float* pull;
    int h, w;
    int eight;            // 8-neighbourhood (else 4)
    int update_pull;      // 0: a mean-field step (energies from pull); 1: pull from energies
    float lambda, tau;
};

// Half of one synchronous mean-field step, one token per thread: the
// energies from the neighbours' pull (neighbours in cpu.rs's order), or,
// between steps, the pull from the energies.
extern "C" __global__ void sfx_gate_field(GateFieldParams p) {
    const int i = sfx_index();
    if (i >= p.h * p.w) return;
    if (p.update_pull) {
        p.pull[i] = 1.0f - 2.0f * (1.0f / (1.0f + expf(p.energies[i] / p.tau)));
        return;
    }
    const int dy8[8] = {-1, -1, -1, 0, 0, 1, 1, 1}, dx8[8] = {-1, 0, 1, -1, 1, -1, 0, 1};
    const int dy4[4] = {-1, 0, 0, 1}, dx4[4] = {0, -1, 1, 0};
    const int n = p.eight ? 8 : 4, y = i / p.w, x = i % p.w;
    float s = 0.0f;
    for (int k = 0; k < n; ++k) {
        const int ny = y + (p.eight ? dy8[k] : dy4[k]);
        const int nx = x + (p.eight ? dx8[k] : dx4[k]);
        if (ny >= 0 && nx >= 0 && ny < p.h && nx < p.w) s = s + p.pull[ny * p.w + nx];
    }
    p.energies[i] = p.unary[i] + p.lambda * s;
}

struct GateRowsParams {
    const float* x;       // the input's rows
    const u32* set_in;    // the input level's index map
    const u32* list;      // the gate level's token list
    const u32* count;     // its length
    float* y;             // the gate's rows
    int c;
    int rows;             // the gate level's positions: the launch's capacity
};

// The input's rows at the gate's tokens, one thread per (token, channel).
extern "C" __global__ void sfx_gate_rows(GateRowsParams p) {
    const int i = sfx_index();
    const int n = sfx_rows(p.count, p.rows);
    if (i >= n * p.c) return;
    const int row = i / p.c, ch = i % p.c;
    p.y[i] = p.x[(size_t)p.set_in[p.list[row]] * p.c + ch];
}
