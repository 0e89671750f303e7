// Element-wise ops over n f32 values; grid-stride loops so any grid size is correct.

// Exact GELU: 0.5 x (1 + erf(x / √2)), as torch's default. Its output feeds only the down
// projection, so it is written in bf16 (rounded once from the f32 result). cuBLASLt's own
// GELU epilogue is the tanh approximation, which Falcon's models do not use.
// x: (n,) f32 -> out: (n,) bf16
extern "C" __global__ void gelu_f32_bf16(const float* __restrict__ x, bf16_t* __restrict__ out, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        float v = x[i];
        out[i] = f32_to_bf16(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)));
    }
}

// out <- silu(gate) * up, in bf16 for the down projection as gelu's.
// gate, up: (n,) f32 -> out: (n,) bf16
extern "C" __global__ void silu_mul_f32_bf16(const float* __restrict__ gate, const float* __restrict__ up,
                                             bf16_t* __restrict__ out, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = f32_to_bf16(g / (1.0f + expf(-g)) * up[i]);
    }
}

// x <- x + y        x, y: (n,)
extern "C" __global__ void add_f32(float* __restrict__ x, const float* __restrict__ y, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        x[i] += y[i];
}

// cuBLASLt multiplies bf16 by bf16: this stages a GEMM input that is f32 (an uploaded
// activation; the ops whose outputs feed only GEMMs write bf16 themselves).
// x: (n,) f32 -> out: (n,) bf16
extern "C" __global__ void cast_f32_bf16(const float* __restrict__ x, bf16_t* __restrict__ out, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(x[i]);
}

// Widens a bf16 vector to f32 (norm weights and biases after a device-side fill, bf16
// activations the host downloads).
extern "C" __global__ void cast_bf16_f32(const bf16_t* __restrict__ x, float* __restrict__ out, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = bf16_to_f32(x[i]);
}

// Deterministic uniform values in [lo, hi) from a hash of (seed, index): the benchmark's
// synthetic weights, made on the device so no 4 GB layer crosses the bus.
extern "C" __global__ void fill_uniform_bf16(bf16_t* __restrict__ out, unsigned long long n,
                                             unsigned long long seed, float lo, float hi) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long z = seed * 0x9E3779B97F4A7C15ull + i;  // splitmix64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        float u = (float)(z >> 40) * (1.0f / 16777216.0f);
        out[i] = f32_to_bf16(lo + (hi - lo) * u);
    }
}
