// The energy layer's unary head, as device functions of a thread index with
// no shared memory or barrier: the host C++ compiler builds them too, and the
// tests check them against src/ersm/cpu.rs bit for bit (with --fmad=false
// every product and sum rounds as there; the convs' and the two-layer
// head's hidden sums are explicit fmaf, one rounding each, as cpu.rs's fused
// multiply-adds). ersm.cu's kernels spread them over
// the whole GPU.

// One conv layer (stride 1, taps `dil` apart, zero padding dil * (k / 2),
// `groups` channel groups),
// NCHW in and out, for the outputs j = tid, tid + nthreads, ... of
// cout × H × W. Each output sums its taps in cpu.rs's order (input channel,
// kernel row, kernel column, then the bias).
__device__ void ersm_head_conv(const float* __restrict__ in, int cin, int H, int W,
                               const float* __restrict__ w, const float* __restrict__ b,
                               int cout, int k, int dil, int groups, int relu,
                               float* __restrict__ out, int tid, int nthreads) {
    const int HW = H * W, cin_g = cin / groups, cout_g = cout / groups, r = dil * (k / 2);
    for (int j = tid; j < cout * HW; j += nthreads) {
        const int co = j / HW, i = j % HW, y = i / W, x = i % W;
        const int g = co / cout_g;
        float acc = 0.0f;
        for (int ci = 0; ci < cin_g; ++ci) {
            const float* plane = in + (size_t)(g * cin_g + ci) * HW;
            const float* taps = w + ((size_t)co * cin_g + ci) * k * k;
            for (int ky = 0; ky < k; ++ky) {
                const int iy = y + dil * ky - r;
                if (iy < 0 || iy >= H) continue;
                for (int kx = 0; kx < k; ++kx) {
                    const int ix = x + dil * kx - r;
                    if (ix < 0 || ix >= W) continue;
                    acc = fmaf(taps[ky * k + kx], plane[iy * W + ix], acc);
                }
            }
        }
        acc = acc + b[co];
        out[j] = relu ? fmaxf(acc, 0.0f) : acc;
    }
}


// The unary cost of token i from `hc` channels of NCHW features `hx` (HW
// positions per channel plane): linear (hidden == 0): w[hc], b; two-layer:
// W1[hidden×hc], b1[hidden], w2[hidden], b2 — all read from `params`.
// Channels in order per token, as cpu.rs sums them.
__device__ float ersm_unary_cost(const float* __restrict__ hx, int hc, int HW, int i,
                                 const float* __restrict__ params, int hidden) {
    if (hidden == 0) {
        float acc = 0.0f;
        #pragma unroll 8
        for (int c = 0; c < hc; ++c) acc = acc + params[c] * hx[(size_t)c * HW + i];
        return acc + params[hc];
    }
    const float* w1 = params;
    const float* b1 = params + hidden * hc;
    const float* w2 = b1 + hidden;
    const float b2 = w2[hidden];
    float acc = 0.0f;
    for (int k = 0; k < hidden; ++k) {
        float h = 0.0f;
        #pragma unroll 8
        for (int c = 0; c < hc; ++c) h = fmaf(w1[k * hc + c], hx[(size_t)c * HW + i], h);
        acc = acc + w2[k] * fmaxf(h + b1[k], 0.0f);
    }
    return acc + b2;
}
