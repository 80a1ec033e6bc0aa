// Token sets and rulebooks built on the device, from the energy kernel's
// kept list where it lies. GPU twins of TokenSet::from_raster,
// TokenSet::downsample and TokenSet::upsample (src/sparse/tokens.rs,
// `LevelParams`) and of Rulebook::build, transposed windows included
// (src/sparse/rulebook.rs, `RulebookParams`).
//
// Each thread owns one output value and finds its rank by counting, so the
// sets come out in raster order without a scan, a barrier or an atomic.

struct LevelParams {
    const u32* set_in;    // the parent level's index map (raster position -> token or SFX_INACTIVE)
    const u32* set_in2;   // a union level's second parent's index map (same map size)
    const u32* list_in;   // the energy kernel's kept list, or the parent level's token list
    const u32* count_in;  // tokens in list_in
    u32* set_out;         // this level's index map
    u32* list_out;        // this level's token list
    u32* count_out;       // its length
    const float* energies;  // a gate's level (rule 4): the gate's energies over the map
    const u32* held;      // rule 4 on a stream: nonzero where the parent's held tokens reach, or null
    int map_h, map_w;     // this level's map
    int in_h, in_w;       // the parent level's map
    int stride;           // from the parent
    int rule;             // stride rule: 0 any, 1 centre; 2: the parent upsampled by `stride`;
                          // 3: the union of the two parents' sets; 4: a gate's narrowing
                          // of the parent's set (its positions of negative energy)
};

// Level 0 from the energy kernel's kept list (ascending): one thread per map
// position finds its token number by binary search; the list is copied.
extern "C" __global__ void sfx_level0(LevelParams p) {
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
__device__ __forceinline__ bool sfx_strided_active(const LevelParams& p, int oy, int ox) {
    const int s = p.stride;
    if (p.rule == 4) {
        const int i = oy * p.in_w + ox;
        return p.set_in[i] != SFX_INACTIVE && (p.energies[i] < 0.0f || (p.held && p.held[i]));
    }
    if (p.rule == 3) {
        const int i = oy * p.in_w + ox;
        return p.set_in[i] != SFX_INACTIVE || p.set_in2[i] != SFX_INACTIVE;
    }
    if (p.rule == 2) {
        const int y = oy / s, x = ox / s;
        return y < p.in_h && x < p.in_w && p.set_in[y * p.in_w + x] != SFX_INACTIVE;
    }
    if (p.rule == 1) {
        const int y = s * oy, x = s * ox;
        return y < p.in_h && x < p.in_w && p.set_in[y * p.in_w + x] != SFX_INACTIVE;
    }
    for (int y = s * oy; y < s * oy + s && y < p.in_h; ++y)
        for (int x = s * ox; x < s * ox + s && x < p.in_w; ++x)
            if (p.set_in[y * p.in_w + x] != SFX_INACTIVE) return true;
    return false;
}

// A strided (or upsampled) level from its parent: one thread per position counts the active
// positions before it (its token number) and in all (the level's size). With
// none active, the position over the parent's first token is, so a level is
// never empty (TokenSet::downsample).
extern "C" __global__ void sfx_level(LevelParams p) {
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
    if (total == 0 && p.rule == 4) {
        // No active position of negative energy (or held): the lowest-energy
        // one, the first in raster order on ties (Gate::keeps).
        int best = -1;
        for (int j = 0; j < hw; ++j)
            if (p.set_in[j] != SFX_INACTIVE && (best < 0 || p.energies[j] < p.energies[best])) best = j;
        active = best >= 0 && q == best;
        before = 0;
        total = best >= 0 ? 1u : 0u;
    } else if (total == 0 && *p.count_in > 0) {
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

struct RulebookParams {
    const u32* set_in;    // the input level's index map
    const u32* list_in;   // the output level's token list
    const u32* count_in;  // its length
    u32* table;           // rows × taps entries
    int map_h, map_w;     // the output level's map
    int in_h, in_w;       // the input level's map
    int stride;
    int kh, kw;
    int pad_top, pad_left;
    int transposed;       // 1: a transposed conv's window (output o reads input (o + pad - k) / stride)
};

// The input position output `o` reads at tap `k` along one axis, or -1 when
// the tap reads nothing there (a transposed conv's taps off the stride).
__device__ __forceinline__ int sfx_source(const RulebookParams& p, int o, int k, int pad) {
    if (!p.transposed) return o * p.stride - pad + k;
    const int n = o + pad - k;
    return n >= 0 && n % p.stride == 0 ? n / p.stride : -1;
}

// A rulebook: one thread per (output token, tap), as Rulebook::build. Launched
// for every position of the output level; threads past its count return.
extern "C" __global__ void sfx_rulebook(RulebookParams p) {
    const int idx = sfx_index();
    const int taps = p.kh * p.kw;
    const int r = idx / taps, t = idx % taps;
    if (r >= p.map_h * p.map_w || r >= (int)*p.count_in) return;
    const int o = (int)p.list_in[r];
    const int y = sfx_source(p, o / p.map_w, t / p.kw, p.pad_top);
    const int x = sfx_source(p, o % p.map_w, t % p.kw, p.pad_left);
    u32 v = SFX_INACTIVE;
    if (y >= 0 && x >= 0 && y < p.in_h && x < p.in_w) {
        const u32 i = p.set_in[y * p.in_w + x];
        v = i == SFX_INACTIVE ? SFX_DROPPED : i;
    }
    p.table[idx] = v;
}

struct GatherMapParams {
    const float* map;     // a dense C × positions map from the prefix
    const u32* list;      // the level's token list (raster positions)
    const u32* count;     // its length
    float* y;             // rows × C token rows
    int c, positions;
    int rows;             // the level's positions: the launch's capacity
};

// A prefix map's rows at a level's active positions, as GatherMap::eval: one
// thread per (token, channel), threads past the count return.
extern "C" __global__ void sfx_gather_map(GatherMapParams p) {
    const int i = sfx_index();
    const int n = sfx_rows(p.count, p.rows);
    if (i >= n * p.c) return;
    const int row = i / p.c, ch = i % p.c;
    p.y[i] = p.map[ch * p.positions + (int)p.list[row]];
}
