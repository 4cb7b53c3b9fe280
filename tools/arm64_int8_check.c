/* The arm64 int8 kernel sets (i8mm, dotprod) against the portable one on random blocks of every type (each set
 * takes them all), in linear and in the soft embedding: the same integer sums and the same float32 operations, so the outputs must agree to 1e-6
 * (measured: equal; dotprod's Q8_0 / IQ4_NL / IQ4_XS within 1e-7: it sums (u - 128) q, one rounding fewer).
 * Built and run by tools/check_arm64.sh (a cross compiler, and qemu-aarch64 to run it on x86-64). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "dg_internal.h"
int dg_nthreads = 1;
extern const dg_int8_set dg_int8_generic, dg_int8_dotprod, dg_int8_i8mm;
static uint16_t f16(float x) { /* positive normal halves only */
    uint32_t u; memcpy(&u, &x, 4);
    int e = ((u >> 23) & 255) - 127 + 15; return (uint16_t)((e << 10) | ((u >> 13) & 1023));
}
static double rel_diff(const float *x, const float *ref, int64_t count) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < count; i++) num += (x[i] - ref[i]) * (double)(x[i] - ref[i]), den += (double)ref[i] * ref[i];
    return den > 0 ? sqrt(num / den) : INFINITY;
}
int main(void) {
    const int types[] = {T_Q4_0, T_Q5_0, T_Q5_1, T_Q8_0, T_Q4_K, T_Q5_K, T_Q6_K, T_MXFP4, T_NVFP4, T_IQ4_NL, T_IQ4_XS,
                         T_IQ3_S, T_IQ2_S};
    const int64_t m = 37, k = 512, n = 7;
    srand(1);
    float *a = malloc(m * k * 4), *c0 = malloc(m * n * 4), *c1 = malloc(m * n * 4);
    for (int64_t i = 0; i < m * k; i++) a[i] = (float)rand() / RAND_MAX * 2 - 1;
    /* soft embedding inputs: m rows of logits over n tokens (every row dense), their maxima and exp sums */
    float *logits = malloc(m * n * 4), row_max[37], row_total[37], *e0 = malloc(m * k * 4), *e1 = malloc(m * k * 4);
    int64_t path[37];
    for (int64_t i = 0; i < m; i++) {
        row_max[i] = -INFINITY, row_total[i] = 0, path[i] = -1;
        for (int64_t j = 0; j < n; j++) logits[i * n + j] = a[i * k + j] * 3, row_max[i] = fmaxf(row_max[i], logits[i * n + j]);
        for (int64_t j = 0; j < n; j++) row_total[i] += expf(logits[i * n + j] - row_max[i]);
    }
    int bad = 0;
    for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
        int type = types[t];
        int64_t rb = k / dg_block_size(type) * dg_type_size(type);
        uint8_t *w = malloc(n * rb);
        for (int64_t i = 0; i < n * rb; i++) w[i] = rand() & 255;
        for (int64_t r = 0; r < n; r++) { /* sane scales */
            uint8_t *row = w + r * rb;
            int bs = dg_type_size(type);
            for (int64_t b = 0; b < rb / bs; b++) {
                uint8_t *blk = row + b * bs;
                uint16_t h = f16(0.01f + 0.01f * (rand() % 7));
                if (type == T_Q6_K) memcpy(blk + 208, &h, 2);
                else if (type == T_MXFP4) blk[0] = 120 + rand() % 8;
                else if (type == T_NVFP4) for (int s = 0; s < 4; s++) blk[s] = (uint8_t)((7 << 3) | (rand() & 7));
                else { /* d first; then Q4_K's and Q5_K's dmin, Q5_1's m */
                    memcpy(blk, &h, 2);
                    if (type == T_Q4_K || type == T_Q5_K || type == T_Q5_1) memcpy(blk + 2, &h, 2);
                }
            }
        }
        const dg_int8_set *sets[] = {&dg_int8_dotprod, &dg_int8_i8mm};
        int rg = dg_int8_generic.linear(a, m, k, type, w, rb, 1.0f, n, c0);
        for (int s = 0; s < 2; s++) {
            if (!sets[s]->supports(type)) {
                printf("%-8s type %2d: not taken\n", sets[s]->name, type);
                bad = 1;
                continue;
            }
            int rc = sets[s]->linear(a, m, k, type, w, rb, 1.0f, n, c1);
            double rel = rel_diff(c1, c0, m * n);
            printf("%-8s type %2d: rc %d/%d rel diff vs generic %.2e\n", sets[s]->name, type, rc, rg, rel);
            bad |= rc != 0 || rel > 1e-6;
            /* the soft embedding: the n rows of w as a table of k columns, against m rows of logits over them */
            int re = dg_int8_generic.soft_embed(logits, m, n, row_max, row_total, path, type, w, rb, 1.0f, k, 1.0f, e0);
            rc = sets[s]->soft_embed(logits, m, n, row_max, row_total, path, type, w, rb, 1.0f, k, 1.0f, e1);
            rel = rel_diff(e1, e0, m * k);
            printf("%-8s type %2d: soft embedding rc %d/%d rel diff vs generic %.2e\n", sets[s]->name, type, rc, re, rel);
            bad |= rc != 0 || re != 0 || rel > 1e-6;
        }
        free(w);
    }
    printf(bad ? "FAIL\n" : "OK\n");
    return bad;
}
