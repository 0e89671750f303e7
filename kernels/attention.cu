// Token-tree attention, flash style: K/V are streamed through shared memory in tiles of
// ATT_BK keys with an online softmax, so no (T, S) score matrix ever exists.
//
// q:     (T, H * D) f32       row t, head h at q[t * H*D + h * D]
// k, v:  (S, KV * D) f32      GQA: head h reads kv head h / (H / KV)
// spans: (T, 3) u32           per query row: shared_start, shared_end, own_start
// out:   (T, H * D) f32
// Query row t attends keys [shared_start, shared_end) ∪ [own_start, t + key_offset].
// Spans are checked against S on the host, so every key index read here is < S.
//
// grid (ceil(T / ATT_WARPS), H), block ATT_WARPS * 32. Warp w owns query row
// blockIdx.x * ATT_WARPS + w of head blockIdx.y. In a key tile, lane j scores key j
// (a whole dot product, no shuffles per key); each lane then accumulates output dims
// lane, lane + 32, ... (D <= ATT_MAXD, checked on the host).
// Tiles cover the union of the block's rows' key ranges; keys outside a row's span are
// masked, so a block that straddles two packed documents stays correct (it only wastes
// the tiles between them).
#define ATT_WARPS 8
#define ATT_BK 32
#define ATT_MAXD 128

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention_f32(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
              const unsigned int* __restrict__ spans, float* __restrict__ out, unsigned int T,
              unsigned int H, unsigned int KV, unsigned int D, unsigned int key_offset, float scale) {
    // +1 column of padding: lane j reads Ks[j][d], which would otherwise hit one bank 32 times.
    __shared__ float Ks[ATT_BK][ATT_MAXD + 1];
    __shared__ float Vs[ATT_BK][ATT_MAXD + 1];
    __shared__ float Qs[ATT_WARPS][ATT_MAXD];
    __shared__ unsigned int range[2];

    const unsigned int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned int h = blockIdx.y, kvh = h / (H / KV);
    const unsigned int t0 = blockIdx.x * ATT_WARPS, t = t0 + warp;
    const bool active = t < T;
    const unsigned long long qld = (unsigned long long)H * D, kld = (unsigned long long)KV * D;

    unsigned int ss = 0, se = 0, os = 1, oe = 0;  // empty span for idle warps
    if (active) {
        ss = spans[3 * t];
        se = spans[3 * t + 1];
        os = spans[3 * t + 2];
        oe = t + key_offset;
    }
    for (unsigned int d = lane; d < D; d += 32) Qs[warp][d] = active ? q[t * qld + h * D + d] : 0.0f;

    if (threadIdx.x == 0) {
        unsigned int lo = 0xffffffffu, hi = 0;
        for (unsigned int w = 0; w < ATT_WARPS && t0 + w < T; w++) {
            unsigned int r = t0 + w;
            unsigned int a = spans[3 * r], b = spans[3 * r + 1], c = spans[3 * r + 2];
            unsigned int start = b > a ? min(a, c) : c;
            lo = min(lo, start);
            hi = max(hi, r + key_offset + 1);
        }
        range[0] = lo;
        range[1] = hi;
    }
    __syncthreads();
    const unsigned int lo = range[0], hi = range[1];

    float m = NEG_INF, l = 0.0f;
    float o[ATT_MAXD / 32];
#pragma unroll
    for (int i = 0; i < ATT_MAXD / 32; i++) o[i] = 0.0f;

    for (unsigned int k0 = lo; k0 < hi; k0 += ATT_BK) {
        for (unsigned int idx = threadIdx.x; idx < ATT_BK * D; idx += blockDim.x) {
            unsigned int j = idx / D, d = idx % D, key = k0 + j;
            float kv = 0.0f, vv = 0.0f;
            if (key < hi) {
                kv = k[key * kld + kvh * D + d];
                vv = v[key * kld + kvh * D + d];
            }
            Ks[j][d] = kv;
            Vs[j][d] = vv;
        }
        __syncthreads();
        if (active) {  // uniform per warp, so the shuffles below see all 32 lanes
            unsigned int key = k0 + lane;
            bool ok = key < hi && ((key >= ss && key < se) || (key >= os && key <= oe));
            float s = NEG_INF;
            if (ok) {
                float dot = 0.0f;
                for (unsigned int d = 0; d < D; d++) dot += Qs[warp][d] * Ks[lane][d];
                s = dot * scale;
            }
            float m_new = fmaxf(m, warp_max(s));
            if (m_new != NEG_INF) {  // warp-uniform: some key of this tile is attended
                float corr = expf(m - m_new);  // m = -inf gives 0
                float p = ok ? expf(s - m_new) : 0.0f;
                l = l * corr + warp_sum(p);
#pragma unroll
                for (int i = 0; i < ATT_MAXD / 32; i++) o[i] *= corr;
                for (int j = 0; j < ATT_BK; j++) {
                    float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
                    for (int i = 0; i < ATT_MAXD / 32; i++) {
                        unsigned int d = lane + 32 * i;
                        if (d < D) o[i] += pj * Vs[j][d];
                    }
                }
                m = m_new;
            }
        }
        __syncthreads();
    }
    if (active) {
        float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
        for (int i = 0; i < ATT_MAXD / 32; i++) {
            unsigned int d = lane + 32 * i;
            if (d < D) out[t * qld + h * D + d] = o[i] * inv;
        }
    }
}
