// Token embedding lookup. Ids are checked against V on the host before launch.
//
// table: (V, C) bf16   ids: (T,) u32   out: (T, C) f32
// grid (T), block 256: one row per block, threads stride over C.
extern "C" __global__ void embed_bf16(const bf16_t* __restrict__ table, const unsigned int* __restrict__ ids,
                                      float* __restrict__ out, unsigned int T, unsigned int C) {
    unsigned int t = blockIdx.x;
    if (t >= T) return;
    const bf16_t* src = table + (unsigned long long)ids[t] * C;
    float* dst = out + (unsigned long long)t * C;
    for (unsigned int c = threadIdx.x; c < C; c += blockDim.x) dst[c] = bf16_to_f32(src[c]);
}
