// Fully connected layers on a dense vector (Gemm, MatMul, 1×1 convs after
// global pooling). GPU twin of src/sparse/ops/linear.rs (`LinearParams`).

struct LinearParams {
    const float* x;      // k values
    const float* w;      // k × n, so neighbouring threads read neighbouring weights
    const float* bias;   // n values
    float* y;            // n values
    int k, n;
    SfxAct act;
};

// y = act(bias + x · W).
extern "C" __global__ void sfx_linear(LinearParams p) {
    const int o = sfx_index();
    if (o >= p.n) return;
    float acc = p.bias[o];
    for (int i = 0; i < p.k; ++i) acc += p.x[i] * p.w[(long)i * p.n + o];
    p.y[o] = sfx_act(acc, p.act);
}
