// Rotary embedding, rotate-half form (HF Llama/Falcon): within each head, element i pairs
// with i + D/2. The host computes the (D/2) inverse frequencies once, HF's way (scaling
// included), so this kernel only forms the angle pos * inv_freq in f32 as the CPU reference
// does before sin/cos.
//
// x: (T, ld) f32, rotated in place on columns [col0, col0 + heads * D)
// pos: (T,) u32
// inv_freq: (D/2,) f32
// grid (T, ceil(heads * D/2 / 256)), block 256: one thread per (head, pair); rows in x, whose
// limit (2^31 - 1) holds any row count.
extern "C" __global__ void rope_f32(float* __restrict__ x, const unsigned int* __restrict__ pos,
                                    const float* __restrict__ inv_freq,
                                    unsigned int T, unsigned int ld, unsigned int col0,
                                    unsigned int heads, unsigned int D) {
    unsigned int t = blockIdx.x;
    unsigned int half = D / 2;
    unsigned int idx = blockIdx.y * blockDim.x + threadIdx.x;
    if (t >= T || idx >= heads * half) return;
    unsigned int h = idx / half, i = idx % half;
    float angle = (float)pos[t] * inv_freq[i];
    float s, c;
    sincosf(angle, &s, &c);
    float* p = x + (unsigned long long)t * ld + col0 + h * D;
    float a = p[i], b = p[i + half];
    p[i] = a * c - b * s;
    p[i + half] = b * c + a * s;
}
