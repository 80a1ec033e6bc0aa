// One conv layer of the energy layer's unary head (stride 1, zero padding
// k / 2, `groups` channel groups), NCHW in and out, for the outputs
// j = tid, tid + nthreads, ... of cout × H × W.
//
// A plain device function of its thread index, with no shared memory or
// barrier, so the host C++ compiler builds it too and the tests check it
// against src/ersm/cpu.rs: each output sums its taps in that file's order
// (input channel, kernel row, kernel column, then the bias), so with
// --fmad=false the two agree bit for bit.
__device__ void ersm_head_conv(const float* __restrict__ in, int cin, int H, int W,
                               const float* __restrict__ w, const float* __restrict__ b,
                               int cout, int k, int groups, int relu,
                               float* __restrict__ out, int tid, int nthreads) {
    const int HW = H * W, cin_g = cin / groups, cout_g = cout / groups, r = k / 2;
    for (int j = tid; j < cout * HW; j += nthreads) {
        const int co = j / HW, i = j % HW, y = i / W, x = i % W;
        const int g = co / cout_g;
        float acc = 0.0f;
        for (int ci = 0; ci < cin_g; ++ci) {
            const float* plane = in + (size_t)(g * cin_g + ci) * HW;
            const float* taps = w + ((size_t)co * cin_g + ci) * k * k;
            for (int ky = 0; ky < k; ++ky) {
                const int iy = y + ky - r;
                if (iy < 0 || iy >= H) continue;
                for (int kx = 0; kx < k; ++kx) {
                    const int ix = x + kx - r;
                    if (ix < 0 || ix >= W) continue;
                    acc = acc + taps[ky * k + kx] * plane[iy * W + ix];
                }
            }
        }
        acc = acc + b[co];
        out[j] = relu ? fmaxf(acc, 0.0f) : acc;
    }
}

