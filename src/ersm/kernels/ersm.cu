// ERSM energy layer: the unary head over the whole GPU (one launch per conv
// layer, then one for the per-token costs), then one block for the rest:
// mean-field steps, threshold with the at-least-one rule, raster-order
// compaction, gather.
//
// The head is most of the layer's arithmetic (2.5 M multiply-adds on the
// shipped model), so it runs on every multiprocessor; what follows needs the
// whole map between phases, so one block of ERSM_THREADS threads runs it and
// every phase is separated by __syncthreads() alone. Results are
// deterministic: each output is one thread's fixed summation order, the
// compaction a block-wide prefix scan, no floating-point atomics. Per-token
// state lives in global scratch (it stays in L2), so map size is bounded by
// memory, not by shared memory.
//
// Compiled with --fmad=false so each product and sum rounds as on the CPU
// (src/ersm/cpu.rs): the unary costs match it bit for bit; the energies differ
// only through expf's last bits. The head's device functions are
// unary_head.cu, which the host prepends to this file.

#define ERSM_THREADS 1024
#define ERSM_WARPS (ERSM_THREADS / 32)

__device__ __forceinline__ float keep_probability(float e, float tau) {
    return 1.0f / (1.0f + expf(e / tau));
}

// What a token of energy e adds to its neighbours' energies (times lambda),
// as src/ersm/cpu.rs's mean field computes it.
__device__ __forceinline__ float ersm_pull(float e, float tau) {
    return 1.0f - 2.0f * keep_probability(e, tau);
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

__device__ __forceinline__ int ersm_global_thread() {
    return (int)(blockIdx.x * blockDim.x + threadIdx.x);
}

// One conv layer of the head over the whole map, one output per thread.
extern "C" __global__ void ersm_head_layer(const float* __restrict__ in, int cin, int H, int W,
                                           const float* __restrict__ w,
                                           const float* __restrict__ b, int cout, int k,
                                           int dil, int groups, int relu,
                                           float* __restrict__ out) {
    ersm_head_conv(in, cin, H, W, w, b, cout, k, dil, groups, relu, out, ersm_global_thread(),
                   (int)(gridDim.x * blockDim.x));
}

// Unary costs of every token from the head's last features `hx` (hc
// channels; the map itself without conv layers) and the per-token head at
// `params`, one token per thread. scratch: unary[HW], then pull[HW] (the
// neighbours' pull before the first mean-field step); energies start as the
// unary costs.
extern "C" __global__ void ersm_unary(const float* __restrict__ hx, int hc, int HW,
                                      const float* __restrict__ params, int hidden, float tau,
                                      float* __restrict__ energies, float* __restrict__ scratch) {
    const int i = ersm_global_thread();
    if (i >= HW) return;
    const float u = ersm_unary_cost(hx, hc, HW, i, params, hidden);
    scratch[i] = u;
    energies[i] = u;
    scratch[HW + i] = ersm_pull(u, tau);
}

// The rest of the layer in one block, from ersm_unary's outputs.
// x: C×H×W features (NCHW, batch 1), read for the gather.
// Outputs: energies[H×W], kept[0..count) raster indices, gathered[count×C], count[0].
// scratch: unary[H×W], pull[H×W], as ersm_unary left them.
// held: on a stream, nonzero at the positions kept whatever their energy (the
// last frames' faces), or null.
extern "C" __global__ void __launch_bounds__(ERSM_THREADS)
ersm_energy_gather(const float* __restrict__ x, int C, int H, int W,
                   float lambda, float tau, int steps, int eight,
                   float* __restrict__ energies, float* __restrict__ scratch,
                   unsigned* __restrict__ kept, float* __restrict__ gathered,
                   unsigned* __restrict__ count, const unsigned* __restrict__ held) {
    __shared__ unsigned warp_sums[ERSM_WARPS];
    __shared__ float best_e[ERSM_THREADS];
    __shared__ unsigned best_i[ERSM_THREADS];
    const int HW = H * W;
    const int tid = threadIdx.x;
    const float* unary = scratch;
    float* pull = scratch + HW;

    // 1. Mean-field steps: synchronous (Jacobi) updates, neighbours in the CPU's order.
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
                    pull[i] = ersm_pull(energies[i], tau);
                __syncthreads();
            }
        }
    }

    // 2. Threshold and compaction: each thread owns a contiguous run of tokens,
    // so a block scan of per-thread counts gives raster-order output slots.
    const int chunk = (HW + ERSM_THREADS - 1) / ERSM_THREADS;
    const int lo = min(tid * chunk, HW), hi = min(lo + chunk, HW);
    unsigned mine = 0;
    for (int i = lo; i < hi; ++i) mine += energies[i] < 0.0f || (held && held[i]);
    unsigned total;
    unsigned slot = block_scan(mine, warp_sums, &total) - mine;
    if (total > 0) {
        for (int i = lo; i < hi; ++i)
            if (energies[i] < 0.0f || (held && held[i])) kept[slot++] = (unsigned)i;
    } else {
        // No negative energy and none held: keep the lowest, the first in
        // raster order on ties.
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

    // 3. Gather kept feature vectors, unscaled, into total×C rows.
    // Consecutive threads read consecutive kept tokens of one channel plane.
    const int n = (int)total;
    for (int j = tid; j < n * C; j += ERSM_THREADS) {
        const int c = j / n, t = j % n;
        gathered[(size_t)t * C + c] = x[(size_t)c * HW + kept[t]];
    }
}
