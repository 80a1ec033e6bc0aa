// Elementwise ops on token rows or dense values: binary (Add, Mul; of two
// levels of the same size on their union: merge.rs), the
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

struct MergeParams {
    const float* a;       // rows of the first operand's level
    const float* b;       // rows of the second operand's level
    const u32* rb_a;      // for each output row, its row in a, or SFX_DROPPED
    const u32* rb_b;      // for each output row, its row in b, or SFX_DROPPED
    const float* fill_a;  // what a holds where it has no row (null: zero)
    const float* fill_b;
    float* y;             // output rows (rows × c) of the union level
    const u32* count;     // output rows in device memory
    int rows;             // output rows the launch can hold
    int c;
    int kind;             // 0 add, 1 mul
};

// y = a ∘ b on the union of two levels' active sets: each operand's row at
// the output's position, or its fill (or zero) where it has none.
extern "C" __global__ void sfx_binary_merge(MergeParams p) {
    const int idx = sfx_index();
    if (idx >= sfx_rows(p.count, p.rows) * p.c) return;
    const int r = idx / p.c, ch = idx % p.c;
    const u32 ra = p.rb_a[r], rb = p.rb_b[r];
    const float a = ra < SFX_DROPPED ? p.a[(long)ra * p.c + ch] : (p.fill_a ? p.fill_a[ch] : 0.0f);
    const float b = rb < SFX_DROPPED ? p.b[(long)rb * p.c + ch] : (p.fill_b ? p.fill_b[ch] : 0.0f);
    p.y[idx] = p.kind == 0 ? a + b : a * b;
}
