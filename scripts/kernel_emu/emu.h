// CPU emulation of the CUDA subset our kernels use: one block at a time, one std::thread
// per CUDA thread, barriers for __syncthreads and warp shuffles.
#include <cmath>
#include <cstring>
#include <algorithm>
#include <barrier>
#include <thread>
#include <vector>
#include <functional>
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __restrict__ __restrict
#define __launch_bounds__(x)
#define __align__(n) __attribute__((aligned(n)))
using std::min; using std::max;
struct dim3_ { unsigned x = 0, y = 0, z = 0; };
thread_local dim3_ threadIdx, blockIdx;
dim3_ blockDim, gridDim;
static std::barrier<>* g_block_bar;
static std::vector<std::barrier<>*> g_warp_bar;
static double g_slots[1024];
inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
template <class T> T shfl_idx(T v, int src) {
    unsigned w = threadIdx.x >> 5;
    g_slots[threadIdx.x] = (double)v;
    g_warp_bar[w]->arrive_and_wait();
    T r = (T)g_slots[w * 32 + src];
    g_warp_bar[w]->arrive_and_wait();
    return r;
}
template <class T> T __shfl_xor_sync(unsigned, T v, int o) { return shfl_idx(v, (threadIdx.x & 31) ^ o); }
template <class T> T __shfl_sync(unsigned, T v, int src) { return shfl_idx(v, src); }
inline int __any_sync(unsigned, int p) {
    int any = p != 0;
    for (int o = 16; o > 0; o >>= 1) any |= __shfl_xor_sync(0xffffffffu, any, o);
    return any;
}
inline void sincosf(float a, float* s, float* c) { *s = sinf(a); *c = cosf(a); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline void launch(dim3_ grid, dim3_ block, std::function<void()> k) {
    gridDim = grid; blockDim = block;
    unsigned n = block.x;
    std::barrier<> bar(n); g_block_bar = &bar;
    std::vector<std::barrier<>*> wb; for (unsigned w = 0; w < (n + 31) / 32; w++) wb.push_back(new std::barrier<>(32));
    g_warp_bar = wb;
    for (unsigned by = 0; by < std::max(1u, grid.y); by++)
        for (unsigned bx = 0; bx < grid.x; bx++) {
            std::vector<std::thread> ts;
            for (unsigned t = 0; t < n; t++)
                ts.emplace_back([=] { threadIdx.x = t; blockIdx.x = bx; blockIdx.y = by; k(); });
            for (auto& t : ts) t.join();
        }
    for (auto* b : wb) delete b;
}
