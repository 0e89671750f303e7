#include <cstdio>
#include <cstdlib>
int main() {
    // Two packed docs with choice trees + key_offset test.
    const unsigned H = 6, KV = 2, D = 80;
    std::vector<unsigned> spans; unsigned T = 0;
    auto doc = [&](unsigned prompt, std::vector<unsigned> choices) {
        unsigned start = T;
        for (unsigned p = 0; p < prompt; p++) { spans.insert(spans.end(), {start, start, start}); T++; }
        unsigned pe = T;
        for (unsigned c : choices) { unsigned os = T; for (unsigned j = 0; j < c; j++) { spans.insert(spans.end(), {start, pe, os}); T++; } }
    };
    doc(37, {2, 0, 4}); doc(5, {1, 3}); doc(50, {6});
    unsigned ko = 3, S = T + ko;
    std::vector<float> q(T * H * D), k(S * KV * D), v(S * KV * D), out(T * H * D, -7), ref(T * H * D, 0);
    srand(1);
    for (auto* a : {&q, &k, &v}) for (auto& x : *a) x = (rand() / (float)RAND_MAX) * 4 - 2;
    float scale = 1.0f / sqrtf((float)D);
    for (unsigned t = 0; t < T; t++) for (unsigned h = 0; h < H; h++) {
        unsigned kv = h / (H / KV);
        std::vector<double> s(S, -INFINITY); double mx = -INFINITY;
        for (unsigned key = 0; key < S; key++) {
            unsigned ss = spans[3*t], se = spans[3*t+1], os = spans[3*t+2];
            if ((key >= ss && key < se) || (key >= os && key <= t + ko)) {
                double d = 0; for (unsigned i = 0; i < D; i++) d += q[t*H*D + h*D + i] * k[key*KV*D + kv*D + i];
                s[key] = d * scale; mx = std::max(mx, s[key]);
            }
        }
        double sum = 0; for (auto x : s) sum += exp(x - mx);
        for (unsigned key = 0; key < S; key++) { double p = exp(s[key] - mx) / sum; for (unsigned i = 0; i < D; i++) ref[t*H*D + h*D + i] += p * v[key*KV*D + kv*D + i]; }
    }
    launch({(T + 7) / 8, H, 1}, {256, 1, 1}, [&] { attention_f32(q.data(), k.data(), v.data(), spans.data(), out.data(), T, H, KV, D, ko, scale); });
    double worst = 0; for (size_t i = 0; i < out.size(); i++) worst = std::max(worst, (double)fabs(out[i] - ref[i]));
    printf("attention T=%u S=%u H=%u KV=%u D=%u: max abs err %.3g\n", T, S, H, KV, D, worst);
    return worst < 1e-4 ? 0 : 1;
}
