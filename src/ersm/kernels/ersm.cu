// ERSM energy layer in one launch: unary energies, mean-field steps, threshold
// with the at-least-one rule, raster-order compaction, gather.
//
// One block of ERSM_THREADS threads runs the whole frame, so every phase is
// separated by __syncthreads() alone and the result is deterministic: fixed
// summation orders, a block-wide prefix scan, no floating-point atomics.
// Per-token state lives in global scratch (it stays in L2), so map size is
// bounded by memory, not by shared memory.
//
// Compiled with --fmad=false so each product and sum rounds as on the CPU
// (src/ersm/cpu.rs): the unary costs match it bit for bit; the energies differ
// only through expf's last bits. The head's conv layers are head_conv.cu,
// which the host prepends to this file.

#define ERSM_THREADS 1024
#define ERSM_WARPS (ERSM_THREADS / 32)

__device__ __forceinline__ float keep_probability(float e, float tau) {
    return 1.0f / (1.0f + expf(e / tau));
}

// Inclusive scan of `v` across the block; returns it, and the block total in *total.
__device__ unsigned block_scan(unsigned v, unsigned* warp_sums, unsigned* total) {
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned x = v;
    for (int o = 1; o < 32; o <<= 1) {
        unsigned y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
        unsigned s = lane < ERSM_WARPS ? warp_sums[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            unsigned y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += y;
        }
        if (lane < ERSM_WARPS) warp_sums[lane] = s;
    }
    __syncthreads();
    const unsigned before = warp == 0 ? 0 : warp_sums[warp - 1];
    *total = warp_sums[ERSM_WARPS - 1];
    __syncthreads();
    return x + before;
}

// x: C×H×W features (NCHW, batch 1). head: first each conv layer's weight
// [cout×(cin/groups)×k×k] and bias [cout], then the per-token head on the
// last conv's output (or x): linear (hidden == 0): w[C'], b; two-layer:
// W1[hidden×C'], b1[hidden], w2[hidden], b2.
// convs: nconv × {cout, k, groups, relu}; conv_scratch: 2 × (largest cout) × H × W floats.
// Outputs: energies[H×W], kept[0..count) raster indices, gathered[count×C], count[0].
// scratch: 2×H×W floats.
extern "C" __global__ void __launch_bounds__(ERSM_THREADS)
ersm_energy_gather(const float* __restrict__ x, int C, int H, int W,
                   const float* __restrict__ head, int hidden,
                   const int* __restrict__ convs, int nconv, float* __restrict__ conv_scratch,
                   float lambda, float tau, int steps, int eight,
                   float* __restrict__ energies, float* __restrict__ scratch,
                   unsigned* __restrict__ kept, float* __restrict__ gathered,
                   unsigned* __restrict__ count) {
    __shared__ unsigned warp_sums[ERSM_WARPS];
    __shared__ float best_e[ERSM_THREADS];
    __shared__ unsigned best_i[ERSM_THREADS];
    const int HW = H * W;
    const int tid = threadIdx.x;
    float* unary = scratch;
    float* pull = scratch + HW;

    // 0. The head's conv layers over the whole map, ping-ponging between two
    // halves of conv_scratch; the per-token head then reads `hx` (hc channels).
    const float* hx = x;
    int hc = C;
    const float* params = head;
    size_t half = 0;
    for (int l = 0; l < nconv; ++l) {
        const size_t n = (size_t)convs[4 * l] * HW;
        half = n > half ? n : half;
    }
    for (int l = 0; l < nconv; ++l) {
        const int cout = convs[4 * l], k = convs[4 * l + 1], groups = convs[4 * l + 2];
        const size_t nw = (size_t)cout * (hc / groups) * k * k;
        float* out = conv_scratch + (l & 1) * half;
        ersm_head_conv(hx, hc, H, W, params, params + nw, cout, k, groups, convs[4 * l + 3], out,
                       tid, ERSM_THREADS);
        params += nw + cout;
        hx = out;
        hc = cout;
        __syncthreads();
    }

    // 1. Unary costs (a GEMV over channels, channels in order per token).
    for (int i = tid; i < HW; i += ERSM_THREADS) {
        float u;
        if (hidden == 0) {
            float acc = 0.0f;
            #pragma unroll 8
            for (int c = 0; c < hc; ++c) acc = acc + params[c] * hx[(size_t)c * HW + i];
            u = acc + params[hc];
        } else {
            const float* w1 = params;
            const float* b1 = params + hidden * hc;
            const float* w2 = b1 + hidden;
            const float b2 = w2[hidden];
            float acc = 0.0f;
            for (int k = 0; k < hidden; ++k) {
                float h = 0.0f;
                #pragma unroll 8
                for (int c = 0; c < hc; ++c) h = h + w1[k * hc + c] * hx[(size_t)c * HW + i];
                acc = acc + w2[k] * fmaxf(h + b1[k], 0.0f);
            }
            u = acc + b2;
        }
        unary[i] = u;
        energies[i] = u;
        pull[i] = 1.0f - 2.0f * keep_probability(u, tau);
    }
    __syncthreads();

    // 2. Mean-field steps: synchronous (Jacobi) updates, neighbours in the CPU's order.
    if (steps > 0 && lambda != 0.0f) {
        const int dy8[8] = {-1, -1, -1, 0, 0, 1, 1, 1}, dx8[8] = {-1, 0, 1, -1, 1, -1, 0, 1};
        const int dy4[4] = {-1, 0, 0, 1}, dx4[4] = {0, -1, 1, 0};
        const int n = eight ? 8 : 4;
        for (int step = 0; step < steps; ++step) {
            for (int i = tid; i < HW; i += ERSM_THREADS) {
                const int y = i / W, xx = i % W;
                float s = 0.0f;
                for (int k = 0; k < n; ++k) {
                    const int ny = y + (eight ? dy8[k] : dy4[k]);
                    const int nx = xx + (eight ? dx8[k] : dx4[k]);
                    if (ny >= 0 && nx >= 0 && ny < H && nx < W) s = s + pull[ny * W + nx];
                }
                energies[i] = unary[i] + lambda * s;
            }
            __syncthreads();
            if (step + 1 < steps) {
                for (int i = tid; i < HW; i += ERSM_THREADS)
                    pull[i] = 1.0f - 2.0f * keep_probability(energies[i], tau);
                __syncthreads();
            }
        }
    }

    // 3. Threshold and compaction: each thread owns a contiguous run of tokens,
    // so a block scan of per-thread counts gives raster-order output slots.
    const int chunk = (HW + ERSM_THREADS - 1) / ERSM_THREADS;
    const int lo = min(tid * chunk, HW), hi = min(lo + chunk, HW);
    unsigned mine = 0;
    for (int i = lo; i < hi; ++i) mine += energies[i] < 0.0f;
    unsigned total;
    unsigned slot = block_scan(mine, warp_sums, &total) - mine;
    if (total > 0) {
        for (int i = lo; i < hi; ++i)
            if (energies[i] < 0.0f) kept[slot++] = (unsigned)i;
    } else {
        // No negative energy: keep the lowest, the first in raster order on ties.
        float be = __int_as_float(0x7f800000);  // +inf
        unsigned bi = 0xffffffffu;
        for (int i = lo; i < hi; ++i)
            if (energies[i] < be) { be = energies[i]; bi = (unsigned)i; }
        best_e[tid] = be;
        best_i[tid] = bi;
        __syncthreads();
        for (int s = ERSM_THREADS / 2; s > 0; s >>= 1) {
            if (tid < s) {
                const float oe = best_e[tid + s];
                const unsigned oi = best_i[tid + s];
                if (oe < best_e[tid] || (oe == best_e[tid] && oi < best_i[tid])) {
                    best_e[tid] = oe;
                    best_i[tid] = oi;
                }
            }
            __syncthreads();
        }
        // All-NaN energies leave no best; token 0 keeps the gather in bounds (the host rejects NaN).
        if (tid == 0) kept[0] = best_i[0] == 0xffffffffu ? 0u : best_i[0];
        total = 1;
    }
    if (tid == 0) count[0] = total;
    __syncthreads();

    // 4. Gather kept feature vectors, unscaled, into total×C rows.
    // Consecutive threads read consecutive kept tokens of one channel plane.
    const int n = (int)total;
    for (int j = tid; j < n * C; j += ERSM_THREADS) {
        const int c = j / n, t = j % n;
        gathered[(size_t)t * C + c] = x[(size_t)c * HW + kept[t]];
    }
}
