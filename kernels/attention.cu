// Token-tree attention, flash style on tensor cores: bf16 mma.sync (m16n8k16) with f32
// accumulation, online softmax in f32, so no (T, S) score matrix ever exists.
//
// q:          (T, H * D) f32     row t, head h at q[t * H*D + h * D]
// k, v:       (S, KV * D) f32    GQA: head h reads kv head h / G, G = H / KV
// spans:      (T, 5) u32         per query row: shared_start, shared_end, path_start, path_end, own_start
// tile_off:   (n_blocks + 1) u32 block b's key tiles are tile_start[tile_off[b] .. tile_off[b + 1])
// tile_start: (tiles,) u32       a tile is keys [start, start + FA_BK); the host plan
//                                (src/backend/cuda/attn_plan.rs) lists only tiles some row of
//                                the block attends, so fully masked tiles are never loaded
// out:        (T, H * D) bf16   only the output projection reads it
// Query row t attends keys [shared_start, shared_end) ∪ [path_start, path_end) ∪ [own_start, t + key_offset].
// Spans are checked against S on the host, so every attended key is < S.
//
// The M dimension of the two products is the (query row, head of the group) pairs of one KV
// head, row-major: m -> t = m / G, h = kv * G + m % G. So one K/V tile in shared memory
// serves every query head of its group (29 in Falcon-180B) and FA_BM / G query rows.
// grid (n_blocks = ceil(T * G / FA_BM), KV), block FA_WARPS * 32: block b owns M-rows
// [FA_BM b, FA_BM (b + 1)), warp w 16 of them, lane l rows w*16 + l/4 and w*16 + l/4 + 8.
// D <= FA_MAXD (checked on the host) is padded with zeros to DP, a multiple of the mma's 16.
#define FA_WARPS 4
#define FA_BM (FA_WARPS * 16)
#define FA_BK 32
#define FA_MAXD 128
// Row strides of the shared tiles in bf16: 8 more than the data keeps the fragment loads
// (8 rows x 4 words per instruction) on 32 different banks.
#define FA_LD (FA_MAXD + 8)
#define FA_LDV (FA_BK + 8)

__device__ __forceinline__ unsigned int ld_pair(const bf16_t* p) {
    return *reinterpret_cast<const unsigned int*>(p);
}

__device__ __forceinline__ unsigned int pack_bf16(float lo, float hi) {
    return (unsigned int)f32_to_bf16(lo) | ((unsigned int)f32_to_bf16(hi) << 16);
}

__device__ __forceinline__ float lo_f32(unsigned int p) { return bf16_to_f32((bf16_t)(p & 0xffffu)); }
__device__ __forceinline__ float hi_f32(unsigned int p) { return bf16_to_f32((bf16_t)(p >> 16)); }

// d (16x8 f32) += A (16x16 bf16, row-major) · B (16x8 bf16, column-major), in PTX's
// mma.m16n8k16 fragment layout (g = lane / 4, c = lane % 4; a register's lower half holds
// the lower index):
//   a[0] = A[g][2c, 2c+1]   a[1] = A[g+8][2c, 2c+1]   a[2] = A[g][2c+8, 2c+9]   a[3] = A[g+8][2c+8, 2c+9]
//   b[0] = B[2c, 2c+1][g]   b[1] = B[2c+8, 2c+9][g]
//   d[0], d[1] = D[g][2c, 2c+1]   d[2], d[3] = D[g+8][2c, 2c+1]
__device__ __forceinline__ void mma_bf16_16816(float* d, const unsigned int* a, const unsigned int* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    // The same product from the other lanes' fragments through shuffles: GPUs without bf16
    // mma (sm_75), and the CPU emulator (scripts/kernel_emu/), which checks the layout above.
    const unsigned int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    for (unsigned int src = 0; src < 4; src++) {
        // Lane 4g + src holds row g (and g + 8) at k = 2 src, 2 src + 1, 2 src + 8, 2 src + 9;
        // lane 4n + src holds column n of B at the same k.
        unsigned int a0 = __shfl_sync(0xffffffffu, a[0], 4 * g + src);
        unsigned int a1 = __shfl_sync(0xffffffffu, a[1], 4 * g + src);
        unsigned int a2 = __shfl_sync(0xffffffffu, a[2], 4 * g + src);
        unsigned int a3 = __shfl_sync(0xffffffffu, a[3], 4 * g + src);
        unsigned int b00 = __shfl_sync(0xffffffffu, b[0], 4 * (2 * c) + src);
        unsigned int b01 = __shfl_sync(0xffffffffu, b[1], 4 * (2 * c) + src);
        unsigned int b10 = __shfl_sync(0xffffffffu, b[0], 4 * (2 * c + 1) + src);
        unsigned int b11 = __shfl_sync(0xffffffffu, b[1], 4 * (2 * c + 1) + src);
        d[0] += lo_f32(a0) * lo_f32(b00) + hi_f32(a0) * hi_f32(b00) + lo_f32(a2) * lo_f32(b01) + hi_f32(a2) * hi_f32(b01);
        d[1] += lo_f32(a0) * lo_f32(b10) + hi_f32(a0) * hi_f32(b10) + lo_f32(a2) * lo_f32(b11) + hi_f32(a2) * hi_f32(b11);
        d[2] += lo_f32(a1) * lo_f32(b00) + hi_f32(a1) * hi_f32(b00) + lo_f32(a3) * lo_f32(b01) + hi_f32(a3) * hi_f32(b01);
        d[3] += lo_f32(a1) * lo_f32(b10) + hi_f32(a1) * hi_f32(b10) + lo_f32(a3) * lo_f32(b11) + hi_f32(a3) * hi_f32(b11);
    }
#endif
}

// One query row's keys: [ss, se) ∪ [ps, pe) ∪ [os, oe]; a row past the end attends nothing.
struct RowSpan {
    unsigned int ss, se, ps, pe, os, oe;
};

__device__ __forceinline__ bool attends(const RowSpan& r, unsigned int key) {
    return (key >= r.ss && key < r.se) || (key >= r.ps && key < r.pe) || (key >= r.os && key <= r.oe);
}

// Whether the row attends any key of [k0, k1).
__device__ __forceinline__ bool touches(const RowSpan& r, unsigned int k0, unsigned int k1) {
    return (r.se > r.ss && r.ss < k1 && r.se > k0) || (r.pe > r.ps && r.ps < k1 && r.pe > k0) || (r.os <= r.oe && r.os < k1 && r.oe >= k0);
}

extern "C" __global__ void __launch_bounds__(FA_WARPS * 32)
flash_attention_f32_bf16(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                         const unsigned int* __restrict__ spans, const unsigned int* __restrict__ tile_off,
                         const unsigned int* __restrict__ tile_start, bf16_t* __restrict__ out, unsigned int T,
                         unsigned int H, unsigned int KV, unsigned int D, unsigned int S, unsigned int key_offset,
                         float scale) {
    __shared__ __align__(16) bf16_t Qs[FA_BM][FA_LD];
    __shared__ __align__(16) bf16_t Ks[FA_BK][FA_LD];   // [key][dim]
    __shared__ __align__(16) bf16_t Vt[FA_MAXD][FA_LDV];  // [dim][key]: PV's B fragments are key pairs

    const unsigned int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
    const unsigned int G = H / KV, kvh = blockIdx.y;
    const unsigned long long M = (unsigned long long)T * G, m0 = (unsigned long long)blockIdx.x * FA_BM;
    const unsigned long long qld = (unsigned long long)H * D, kld = (unsigned long long)KV * D;
    const unsigned int DP = (D + 15u) & ~15u;

    for (unsigned int idx = threadIdx.x; idx < FA_BM * DP; idx += blockDim.x) {
        unsigned int r = idx / DP, d = idx % DP;
        unsigned long long m = m0 + r;
        float val = 0.0f;
        if (m < M && d < D) val = q[(m / G) * qld + (unsigned long long)(kvh * G + (unsigned int)(m % G)) * D + d];
        Qs[r][d] = f32_to_bf16(val);
    }

    // This lane's rows (i = 0: g, i = 1: g + 8 of the warp's 16).
    RowSpan row[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        unsigned long long m = m0 + warp * 16 + g + 8 * i;
        row[i] = RowSpan{0, 0, 0, 0, 1, 0};
        if (m < M) {
            unsigned long long t = m / G;
            row[i] = RowSpan{spans[5 * t], spans[5 * t + 1], spans[5 * t + 2], spans[5 * t + 3], spans[5 * t + 4], (unsigned int)t + key_offset};
        }
    }
    __syncthreads();
    unsigned int qf[FA_MAXD / 16][4];
#pragma unroll
    for (int kk = 0; kk < FA_MAXD / 16; kk++) {
        if (kk * 16 < (int)DP) {
            const bf16_t* r0 = &Qs[warp * 16 + g][kk * 16 + 2 * c];
            const bf16_t* r1 = &Qs[warp * 16 + g + 8][kk * 16 + 2 * c];
            qf[kk][0] = ld_pair(r0);
            qf[kk][1] = ld_pair(r1);
            qf[kk][2] = ld_pair(r0 + 8);
            qf[kk][3] = ld_pair(r1 + 8);
        }
    }

    float mrow[2] = {NEG_INF, NEG_INF}, lrow[2] = {0.0f, 0.0f};
    float o[FA_MAXD / 8][4];
#pragma unroll
    for (int n = 0; n < FA_MAXD / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;

    for (unsigned int ti = tile_off[blockIdx.x]; ti < tile_off[blockIdx.x + 1]; ti++) {
        const unsigned int k0 = tile_start[ti];
        __syncthreads();  // every warp is done reading the previous tile
        for (unsigned int idx = threadIdx.x; idx < FA_BK * DP; idx += blockDim.x) {
            unsigned int j = idx / DP, d = idx % DP, key = k0 + j;
            float kv = 0.0f, vv = 0.0f;
            if (key < S && d < D) {
                kv = k[key * kld + kvh * D + d];
                vv = v[key * kld + kvh * D + d];
            }
            Ks[j][d] = f32_to_bf16(kv);
            Vt[d][j] = f32_to_bf16(vv);
        }
        __syncthreads();
        // A warp none of whose rows attends this tile skips it (warp-uniform; the barriers
        // above are reached by every warp either way).
        if (!__any_sync(0xffffffffu, touches(row[0], k0, k0 + FA_BK) || touches(row[1], k0, k0 + FA_BK))) continue;

        // S = Q Kᵀ (16 x FA_BK per warp)
        float s[FA_BK / 8][4];
#pragma unroll
        for (int n = 0; n < FA_BK / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < FA_MAXD / 16; kk++) {
            if (kk * 16 < (int)DP) {
#pragma unroll
                for (int n = 0; n < FA_BK / 8; n++) {
                    const bf16_t* kp = &Ks[n * 8 + g][kk * 16 + 2 * c];
                    unsigned int b[2] = {ld_pair(kp), ld_pair(kp + 8)};
                    mma_bf16_16816(s[n], qf[kk], b);
                }
            }
        }
        // Mask, scale, online softmax. A row's 16 x FA_BK scores sit in the 4 lanes of its group.
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int n = 0; n < FA_BK / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                unsigned int key = k0 + n * 8 + 2 * c + (e & 1);
                float val = attends(row[e >> 1], key) ? s[n][e] * scale : NEG_INF;
                s[n][e] = val;
                mx[e >> 1] = fmaxf(mx[e >> 1], val);
            }
        }
        float base[2], corr[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int i = 0; i < 2; i++) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
            float m_new = fmaxf(mrow[i], mx[i]);
            base[i] = m_new == NEG_INF ? 0.0f : m_new;  // a row with nothing attended yet keeps 0s
            corr[i] = expf(mrow[i] - base[i]);          // mrow = -inf gives 0
            mrow[i] = m_new;
        }
#pragma unroll
        for (int n = 0; n < FA_BK / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float p = expf(s[n][e] - base[e >> 1]);  // masked: exp(-inf) = 0
                s[n][e] = p;
                sum[e >> 1] += p;
            }
        }
#pragma unroll
        for (int i = 0; i < 2; i++) {
            sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 1);
            sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], 2);
            lrow[i] = lrow[i] * corr[i] + sum[i];
        }
#pragma unroll
        for (int n = 0; n < FA_MAXD / 8; n++) {
            o[n][0] *= corr[0];
            o[n][1] *= corr[0];
            o[n][2] *= corr[1];
            o[n][3] *= corr[1];
        }
        // O += P V: P's accumulator fragments are already the A fragments of this product.
#pragma unroll
        for (int kk = 0; kk < FA_BK / 16; kk++) {
            unsigned int a[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                 pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int n = 0; n < FA_MAXD / 8; n++) {
                if (n * 8 < (int)DP) {
                    const bf16_t* vp = &Vt[n * 8 + g][kk * 16 + 2 * c];
                    unsigned int b[2] = {ld_pair(vp), ld_pair(vp + 8)};
                    mma_bf16_16816(o[n], a, b);
                }
            }
        }
    }

#pragma unroll
    for (int i = 0; i < 2; i++) {
        // Recomputed rather than held through the loop, which is short of registers.
        unsigned long long m = m0 + warp * 16 + g + 8 * i;
        if (m >= M) continue;
        unsigned long long at = (m / G) * qld + (unsigned long long)(kvh * G + (unsigned int)(m % G)) * D;
        float inv = lrow[i] > 0.0f ? 1.0f / lrow[i] : 0.0f;
#pragma unroll
        for (int n = 0; n < FA_MAXD / 8; n++) {
            unsigned int d = n * 8 + 2 * c;
            if (d < D) out[at + d] = f32_to_bf16(o[n][2 * i] * inv);
            if (d + 1 < D) out[at + d + 1] = f32_to_bf16(o[n][2 * i + 1] * inv);
        }
    }
}
