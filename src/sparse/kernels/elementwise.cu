// Elementwise ops on token rows or dense values: binary (Add, Mul), the
// per-channel affine map, and a lone activation (with none, a copy).
// GPU twins of src/sparse/ops/binary.rs (`BinaryParams`), affine.rs
// (`AffineParams`) and activation.rs (`ActivationParams`).

struct BinaryParams {
    const float* a;      // the token operand when there is one
    const float* b;      // n values, or one per channel (per_channel > 0)
    float* y;
    const u32* count;    // token rows of `a` in device memory (null: dense, n values)
    int n;               // values the launch can hold
    int row_len;         // values per token row, with count
    int per_channel;     // channels of a per-channel b, else 0
    int kind;            // 0 add, 1 mul
};

// y = a ∘ b elementwise.
extern "C" __global__ void sfx_binary(BinaryParams p) {
    const int idx = sfx_index();
    if (idx >= sfx_len(p.count, p.row_len, p.n)) return;
    const float b = p.per_channel > 0 ? p.b[idx % p.per_channel] : p.b[idx];
    const float a = p.a[idx];
    p.y[idx] = p.kind == 0 ? a + b : a * b;
}

struct AffineParams {
    const float* x;
    const float* scale;  // c values
    const float* shift;  // c values
    float* y;
    const u32* count;    // token rows in device memory (null: dense, n values)
    int n;               // values the launch can hold
    int row_len;         // values per token row, with count
    int c;               // channels
    int inner;           // consecutive values sharing a channel (1 for token rows)
};

// y = x · scale[ch] + shift[ch].
extern "C" __global__ void sfx_affine(AffineParams p) {
    const int idx = sfx_index();
    if (idx >= sfx_len(p.count, p.row_len, p.n)) return;
    const int ch = (idx / p.inner) % p.c;
    p.y[idx] = p.x[idx] * p.scale[ch] + p.shift[ch];
}

struct ActivationParams {
    const float* x;
    float* y;
    const u32* count;    // token rows in device memory (null: dense, n values)
    int n;               // values the launch can hold
    int row_len;         // values per token row, with count
    SfxAct act;          // code 0: a plain copy
};

// A lone activation.
extern "C" __global__ void sfx_activation(ActivationParams p) {
    const int idx = sfx_index();
    if (idx >= sfx_len(p.count, p.row_len, p.n)) return;
    p.y[idx] = sfx_act(p.x[idx], p.act);
}
