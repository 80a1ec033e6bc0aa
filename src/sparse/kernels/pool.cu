// Global average pooling of a token map. GPU twin of src/sparse/ops/pool.rs
// (`GlobalMeanParams`).

struct GlobalMeanParams {
    const float* x;      // token rows (rows × c)
    const float* fill;   // the input's fill vector (null: mean over active tokens only)
    float* y;            // c values
    const u32* count;    // token rows in device memory
    int rows;            // rows the input can hold
    int c;
    int positions;       // positions of the map (with a fill, the mean is over all of them)
};

// One thread per channel, rows in order, then one multiply by the
// reciprocal (as the CPU executor does). With a fill, the dropped positions
// hold it.
extern "C" __global__ void sfx_global_mean(GlobalMeanParams p) {
    const int c = sfx_index();
    if (c >= p.c) return;
    const int rows = sfx_rows(p.count, p.rows);
    float s = 0.0f;
    for (int r = 0; r < rows; ++r) s += p.x[(long)r * p.c + c];
    if (p.fill) {
        const int dropped = p.positions > rows ? p.positions - rows : 0;
        s += (float)dropped * p.fill[c];
        p.y[c] = s * (1.0f / (float)(p.positions > 1 ? p.positions : 1));
    } else {
        p.y[c] = s * (1.0f / (float)(rows > 1 ? rows : 1));
    }
}
