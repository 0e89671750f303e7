// Log-softmax over the vocabulary, only at the rows the caller needs (the LM head runs
// at scored rows only, so S is small and V is large: one block per row).
//
// logits: (S, V) f32   targets: (S,) u32 (checked < V on the host)   out: (S,) f64
// grid (S), block 256. The sum of exponentials is accumulated in f64 like the CPU reference.
extern "C" __global__ void log_softmax_at_f32(const float* __restrict__ logits, const unsigned int* __restrict__ targets,
                                              double* __restrict__ out, unsigned int S, unsigned int V) {
    __shared__ float fscratch[32];
    __shared__ double dscratch[32];
    unsigned int s = blockIdx.x;
    if (s >= S) return;
    const float* row = logits + (unsigned long long)s * V;
    float m = NEG_INF;
    for (unsigned int v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, row[v]);
    m = block_max(m, fscratch);
    double acc = 0.0;
    for (unsigned int v = threadIdx.x; v < V; v += blockDim.x) acc += exp((double)row[v] - (double)m);
    acc = block_sum_f64(acc, dscratch);
    if (threadIdx.x == 0) out[s] = (double)row[targets[s]] - ((double)m + log(acc));
}

// logits, out: (S, V) f32; grid (S), block 256.
extern "C" __global__ void log_softmax_f32(const float* __restrict__ logits, float* __restrict__ out,
                                           unsigned int S, unsigned int V) {
    __shared__ float fscratch[32];
    __shared__ double dscratch[32];
    unsigned int s = blockIdx.x;
    if (s >= S) return;
    const float* row = logits + (unsigned long long)s * V;
    float m = NEG_INF;
    for (unsigned int v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, row[v]);
    m = block_max(m, fscratch);
    double acc = 0.0;
    for (unsigned int v = threadIdx.x; v < V; v += blockDim.x) acc += exp((double)row[v] - (double)m);
    double lse = (double)m + log(block_sum_f64(acc, dscratch));
    float* o = out + (unsigned long long)s * V;
    for (unsigned int v = threadIdx.x; v < V; v += blockDim.x) o[v] = (float)((double)row[v] - lse);
}
