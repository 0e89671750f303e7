#include <cstdio>
#include <cstdlib>
// flash_attention_f32_bf16 against a dense f64 reference on packed token trees: GQA groups of 3
// and of 29 (Falcon-180B), a head dim that needs zero padding (8), a KV cache offset, long
// causal rows (online-softmax rescaling over many tiles), and two kinds of tile plan: only
// the aligned tiles some row of the block attends (masked tiles skipped), and every tile
// from the block's first key (the kernel masks what the plan over-covers); and extract's
// branch rows over kept keys: a kept prompt, each branch's own kept path, its own rows.
struct Case { unsigned H, KV, D, ko; bool dense_plan; std::vector<unsigned> spans; unsigned T; };

static void doc(Case& c, unsigned prompt, std::vector<unsigned> choices) {
    unsigned start = c.T;
    for (unsigned p = 0; p < prompt; p++) { c.spans.insert(c.spans.end(), {start, start, start, start, start}); c.T++; }
    unsigned pe = c.T;
    for (unsigned ch : choices) { unsigned os = c.T; for (unsigned j = 0; j < ch; j++) { c.spans.insert(c.spans.end(), {start, pe, os, os, os}); c.T++; } }
}

// A branch of `rows` rows after c.ko kept keys: the kept prompt [ss, se), its kept path [ps, pe).
static void branch(Case& c, unsigned ss, unsigned se, unsigned ps, unsigned pe, unsigned rows) {
    unsigned os = c.ko + c.T;
    for (unsigned j = 0; j < rows; j++) { c.spans.insert(c.spans.end(), {ss, se, ps, pe, os}); c.T++; }
}

static bool run(Case c, unsigned seed) {
    const unsigned T = c.T, H = c.H, KV = c.KV, D = c.D, ko = c.ko, S = T + ko, G = H / KV, BM = 64, BK = 32;
    std::vector<float> q(T * H * D), k(S * KV * D), v(S * KV * D);
    std::vector<bf16_t> out(T * H * D, f32_to_bf16(-7.0f));  // an unwritten output shows as -7
    std::vector<double> ref(T * H * D, 0);
    srand(seed);
    for (auto* a : {&q, &k, &v}) for (auto& x : *a) x = (rand() / (float)RAND_MAX) * 4 - 2;
    const auto& sp = c.spans;
    auto att = [&](unsigned t, unsigned key) { return (key >= sp[5*t] && key < sp[5*t+1]) || (key >= sp[5*t+2] && key < sp[5*t+3]) || (key >= sp[5*t+4] && key <= t + ko); };
    float scale = 1.0f / sqrtf((float)D);
    for (unsigned t = 0; t < T; t++) for (unsigned h = 0; h < H; h++) {
        unsigned kv = h / G;
        std::vector<double> s(S, -INFINITY); double mx = -INFINITY;
        for (unsigned key = 0; key < S; key++) if (att(t, key)) {
            double d = 0; for (unsigned i = 0; i < D; i++) d += (double)q[t*H*D + h*D + i] * k[key*KV*D + kv*D + i];
            s[key] = d * scale; mx = std::max(mx, s[key]);
        }
        double sum = 0; for (auto x : s) sum += exp(x - mx);
        for (unsigned key = 0; key < S; key++) { double p = exp(s[key] - mx) / sum; for (unsigned i = 0; i < D; i++) ref[t*H*D + h*D + i] += p * v[key*KV*D + kv*D + i]; }
    }
    unsigned blocks = (T * G + BM - 1) / BM, skipped = 0, listed = 0;
    std::vector<unsigned> off = {0}, starts;
    for (unsigned b = 0; b < blocks; b++) {
        unsigned t_lo = b * BM / G, t_hi = std::min(T - 1, ((b + 1) * BM - 1) / G), lo = S;
        for (unsigned t = t_lo; t <= t_hi; t++) {
            unsigned first = sp[5*t+4];
            if (sp[5*t+1] > sp[5*t]) first = std::min(first, sp[5*t]);
            if (sp[5*t+3] > sp[5*t+2]) first = std::min(first, sp[5*t+2]);
            lo = std::min(lo, first);
        }
        for (unsigned k0 = c.dense_plan ? lo : 0; k0 < t_hi + ko + 1; k0 += BK) {
            bool any = false;
            for (unsigned t = t_lo; t <= t_hi && !any; t++) for (unsigned key = k0; key < k0 + BK && key < S && !any; key++) any = att(t, key);
            if (any || c.dense_plan) { starts.push_back(k0); listed++; } else skipped++;
        }
        off.push_back(starts.size());
    }
    launch({blocks, KV, 1}, {128, 1, 1}, [&] {
        flash_attention_f32_bf16(q.data(), k.data(), v.data(), sp.data(), off.data(), starts.data(), out.data(), T, H, KV, D, S, ko, scale);
    });
    double worst = 0; for (size_t i = 0; i < out.size(); i++) worst = std::max(worst, fabs(bf16_to_f32(out[i]) - ref[i]));
    // bf16 rounding of q, k, v and the probabilities: ~2^-8 relative on values of ~1.
    bool ok = worst < 2.5e-2;
    printf("flash_attention T=%u S=%u H=%u KV=%u D=%u key_offset=%u %s plan (%u tiles, %u masked skipped): max abs err %.3g %s\n",
           T, S, H, KV, D, ko, c.dense_plan ? "dense" : "aligned", listed, skipped, worst, ok ? "ok" : "FAIL");
    return ok;
}

int main() {
    bool ok = true;
    Case a{6, 2, 80, 3, false, {}, 0};
    doc(a, 37, {2, 0, 4}); doc(a, 5, {1, 3}); doc(a, 50, {6});
    ok &= run(a, 1);
    Case b{29, 1, 64, 0, false, {}, 0};
    doc(b, 9, {3, 1, 2}); doc(b, 4, {2, 2});
    ok &= run(b, 2);
    Case c{4, 2, 8, 0, true, {}, 0};
    doc(c, 100, {});
    ok &= run(c, 3);
    // 150 kept keys: a prompt [0, 40) whose branches' paths are [40, 45), [45, 120) (wide:
    // whole tiles between the prompt and the rows masked for all), none; then [120, 150),
    // another document's prompt, one branch with the path [148, 150) touching it.
    Case d{6, 2, 64, 150, false, {}, 0};
    branch(d, 0, 40, 40, 45, 5); branch(d, 0, 40, 45, 120, 9); branch(d, 0, 40, 0, 0, 3); branch(d, 120, 148, 148, 150, 4);
    ok &= run(d, 4);
    return ok ? 0 : 1;
}
