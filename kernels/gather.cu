// Row and column gathers. Row indices are checked on the host before launch.

// out (T, W) = x (T, C)[:, start .. start + W)
// grid (T, ceil(W / 256)), block 256: rows in x, whose limit (2^31 - 1) holds any row count
extern "C" __global__ void cols_f32(const float* __restrict__ x, float* __restrict__ out, unsigned int T,
                                    unsigned int C, unsigned int start, unsigned int W) {
    unsigned int t = blockIdx.x, c = blockIdx.y * blockDim.x + threadIdx.x;
    if (t >= T || c >= W) return;
    out[(unsigned long long)t * W + c] = x[(unsigned long long)t * C + start + c];
}

// out (R, C) = x (·, C)[rows]        rows: (R,) u32
// grid (R), block 256
extern "C" __global__ void rows_f32(const float* __restrict__ x, const unsigned int* __restrict__ rows,
                                    float* __restrict__ out, unsigned int R, unsigned int C) {
    unsigned int r = blockIdx.x;
    if (r >= R) return;
    const float* src = x + (unsigned long long)rows[r] * C;
    float* dst = out + (unsigned long long)r * C;
    for (unsigned int c = threadIdx.x; c < C; c += blockDim.x) dst[c] = src[c];
}
