#include <cstdio>
#include <cstdlib>
int main() {
    int bad = 0; srand(2);
    const unsigned T = 3, C = 1000, V = 3000;
    std::vector<float> x(T * C), w(C), b(C);
    std::vector<bf16_t> o(T * C);
    for (auto* a : {&x, &w, &b}) for (auto& e : *a) e = (rand() / (float)RAND_MAX) * 4 - 2;
    // Outputs that feed GEMMs are bf16: within half a bf16 ulp of the f64 value, 2^-8 relative
    // (8 significant bits), plus f32 noise.
    const double round_tol = 1.02 / 256;
    auto rel = [](double got, double want) { return fabs(got - want) / std::max(fabs(want), 1e-3); };
    launch({T, 1, 1}, {256, 1, 1}, [&] { layer_norm_f32_bf16(x.data(), w.data(), b.data(), o.data(), T, C, 1e-5f); });
    double worst = 0;
    for (unsigned t = 0; t < T; t++) {
        double m = 0, var = 0; for (unsigned c = 0; c < C; c++) m += x[t*C+c]; m /= C;
        for (unsigned c = 0; c < C; c++) var += (x[t*C+c]-m)*(x[t*C+c]-m); var /= C;
        for (unsigned c = 0; c < C; c++) worst = std::max(worst, rel(bf16_to_f32(o[t*C+c]), (x[t*C+c]-m)/sqrt(var+1e-5)*w[c]+b[c]));
    }
    printf("layer_norm (bf16 out) max rel err %.3g\n", worst); bad |= worst > round_tol;
    launch({T, 1, 1}, {256, 1, 1}, [&] { rms_norm_f32_bf16(x.data(), w.data(), o.data(), T, C, 1e-6f); });
    worst = 0;
    for (unsigned t = 0; t < T; t++) {
        double ms = 0; for (unsigned c = 0; c < C; c++) ms += (double)x[t*C+c] * x[t*C+c]; ms /= C;
        for (unsigned c = 0; c < C; c++) worst = std::max(worst, rel(bf16_to_f32(o[t*C+c]), x[t*C+c] / sqrt(ms + 1e-6) * w[c]));
    }
    printf("rms_norm (bf16 out) max rel err %.3g\n", worst); bad |= worst > round_tol;
    {
        const unsigned n = T * C;
        std::vector<bf16_t> g(n), s(n);
        launch({4, 1, 1}, {256, 1, 1}, [&] { gelu_f32_bf16(x.data(), g.data(), n); });
        launch({4, 1, 1}, {256, 1, 1}, [&] { silu_mul_f32_bf16(x.data(), b.data(), s.data(), C); });
        double wg = 0, ws = 0;
        for (unsigned i = 0; i < n; i++) wg = std::max(wg, rel(bf16_to_f32(g[i]), 0.5 * x[i] * (1 + erf(x[i] / sqrt(2.0)))));
        for (unsigned i = 0; i < C; i++) ws = std::max(ws, rel(bf16_to_f32(s[i]), x[i] / (1 + exp(-(double)x[i])) * b[i]));
        printf("gelu (bf16 out) max rel err %.3g, silu_mul %.3g\n", wg, ws); bad |= wg > round_tol || ws > round_tol;
    }
    std::vector<float> l(T * V); for (auto& e : l) e = (rand() / (float)RAND_MAX) * 40 - 20;
    std::vector<unsigned> tg = {0, V - 1, 17}; std::vector<double> r(T);
    launch({T, 1, 1}, {256, 1, 1}, [&] { log_softmax_at_f32(l.data(), tg.data(), r.data(), T, V); });
    worst = 0;
    for (unsigned t = 0; t < T; t++) { double mx = -1e30, s = 0; for (unsigned i = 0; i < V; i++) mx = std::max(mx, (double)l[t*V+i]);
        for (unsigned i = 0; i < V; i++) s += exp(l[t*V+i] - mx); worst = std::max(worst, fabs(r[t] - (l[t*V+tg[t]] - mx - log(s)))); }
    printf("log_softmax_at max err %.3g\n", worst); bad |= worst > 1e-9;
    std::vector<unsigned short> h(5); std::vector<float> f = {1.0f, 3.14159f, -2.5e-3f, 65504.f, 1.00390625f};
    launch({1, 1, 1}, {32, 1, 1}, [&] { cast_f32_bf16(f.data(), h.data(), 5); });
    printf("bf16 bits: %04x %04x %04x %04x %04x (want 3f80 4049 bb24 4780 3f80)\n", h[0], h[1], h[2], h[3], h[4]);
    // rope and cols with rows in grid x (any row count), columns in y.
    {
        const unsigned R = 5, heads = 3, D = 16, ld = heads * D + 8, half = D / 2;
        std::vector<float> xr(R * ld), x0, fr(half); std::vector<unsigned> pos(R);
        for (auto& e : xr) e = (rand() / (float)RAND_MAX) * 2 - 1;
        for (unsigned i = 0; i < half; i++) fr[i] = powf(10000.f, -(float)i / half);
        for (unsigned r = 0; r < R; r++) pos[r] = 37 * r;
        x0 = xr;
        launch({R, (heads * half + 255) / 256, 1}, {256, 1, 1}, [&] { rope_f32(xr.data(), pos.data(), fr.data(), R, ld, 4, heads, D); });
        double w = 0;
        for (unsigned r = 0; r < R; r++) for (unsigned h = 0; h < heads; h++) for (unsigned i = 0; i < half; i++) {
            const float* p = &x0[r * ld + 4 + h * D]; double a = pos[r] * (double)fr[i];
            w = std::max(w, fabs(xr[r * ld + 4 + h * D + i] - (p[i] * cos(a) - p[i + half] * sin(a))));
            w = std::max(w, fabs(xr[r * ld + 4 + h * D + i + half] - (p[i + half] * cos(a) + p[i] * sin(a))));
        }
        printf("rope max err %.3g\n", w); bad |= w > 1e-3;
        std::vector<float> c(R * 300);
        launch({R, (300 + 255) / 256, 1}, {256, 1, 1}, [&] { cols_f32(xr.data(), c.data(), R, ld, 2, 300 > ld - 2 ? ld - 2 : 300); });
        unsigned W = ld - 2; w = 0;
        for (unsigned r = 0; r < R; r++) for (unsigned j = 0; j < W; j++) w = std::max(w, (double)fabs(c[r * W + j] - xr[r * ld + 2 + j]));
        printf("cols max err %.3g\n", w); bad |= w != 0;
    }
    return bad;
}
