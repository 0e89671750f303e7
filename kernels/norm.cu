// Row-wise norms. Weights and biases of norms are kept in f32 on the device (they are
// tiny, and the CPU reference reads them exactly). A norm's output is only ever a GEMM's
// input, so it is written in bf16, computed in f32 and rounded once: what the GEMM would
// otherwise round it to in a pass of its own.
//
// x: (T, C) f32   w, b: (C,) f32   out: (T, C) bf16
// grid (T), block 256 (a multiple of 32): one row per block. Two passes over the row
// (mean, then centred variance) like the CPU reference, which avoids E[x²]-E[x]² cancellation.
extern "C" __global__ void layer_norm_f32_bf16(const float* __restrict__ x, const float* __restrict__ w,
                                               const float* __restrict__ b, bf16_t* __restrict__ out,
                                               unsigned int T, unsigned int C, float eps) {
    __shared__ float scratch[32];
    unsigned int t = blockIdx.x;
    if (t >= T) return;  // uniform per block: no thread of this block reaches a barrier
    const float* row = x + (unsigned long long)t * C;
    float s = 0.0f;
    for (unsigned int c = threadIdx.x; c < C; c += blockDim.x) s += row[c];
    float mean = block_sum(s, scratch) / (float)C;
    float v = 0.0f;
    for (unsigned int c = threadIdx.x; c < C; c += blockDim.x) {
        float d = row[c] - mean;
        v += d * d;
    }
    float var = block_sum(v, scratch) / (float)C;
    float inv = rsqrtf(var + eps);
    bf16_t* o = out + (unsigned long long)t * C;
    for (unsigned int c = threadIdx.x; c < C; c += blockDim.x) o[c] = f32_to_bf16((row[c] - mean) * inv * w[c] + b[c]);
}

// x: (T, C) f32   w: (C,) f32   out: (T, C) bf16
extern "C" __global__ void rms_norm_f32_bf16(const float* __restrict__ x, const float* __restrict__ w,
                                             bf16_t* __restrict__ out, unsigned int T, unsigned int C, float eps) {
    __shared__ float scratch[32];
    unsigned int t = blockIdx.x;
    if (t >= T) return;
    const float* row = x + (unsigned long long)t * C;
    float s = 0.0f;
    for (unsigned int c = threadIdx.x; c < C; c += blockDim.x) s += row[c] * row[c];
    float inv = rsqrtf(block_sum(s, scratch) / (float)C + eps);
    bf16_t* o = out + (unsigned long long)t * C;
    for (unsigned int c = threadIdx.x; c < C; c += blockDim.x) o[c] = f32_to_bf16(row[c] * inv * w[c]);
}
