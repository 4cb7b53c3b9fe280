/* dg_int8.c's kernel sets named by SETS (e.g. -DSETS='X(dotprod) X(i8mm)') against the portable one, on random
 * blocks of every type each takes: linear, the dense MLP (dg_ffn with one expert) and the soft embedding. The
 * integer sums are the same and so are the float32 operations, so they agree to 1e-6 (measured on dotprod and
 * i8mm: equal; dotprod's Q8_0 / IQ4_NL / IQ4_XS within 1e-7: it sums (u - 128) q, one rounding fewer). BF16 on
 * the sets that take it: float32 sums of exact bfloat16 products, whose order is the instruction's (or SIMDe's
 * model of it), so 1e-6 too. Every quantized type must be taken by every set.
 * Built and run, on one thread, by tools/check_arm64.sh (arm64 sets, under qemu-aarch64) and
 * tools/check_x86_simde.sh (x86-64 sets this CPU may lack, their intrinsics from SIMDe's portable versions). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "dg_internal.h"
int dg_nthreads = 1;
#define X(name) extern const dg_int8_set dg_int8_##name;
X(generic) SETS
#undef X

static uint16_t f16(float x) { /* positive normal halves only */
    uint32_t u; memcpy(&u, &x, 4);
    int e = ((u >> 23) & 255) - 127 + 15; return (uint16_t)((e << 10) | ((u >> 13) & 1023));
}

static float uniform(void) { return (float)rand() / RAND_MAX * 2 - 1; }

/* `rows` random rows of k values in `type`, with sane scales; *row_bytes set. */
static uint8_t *random_rows(int type, int64_t rows, int64_t k, int64_t *row_bytes) {
    const int64_t rb = *row_bytes = k / dg_block_size(type) * dg_type_size(type);
    uint8_t *w = malloc(rows * rb);
    for (int64_t i = 0; i < rows * rb; i++) w[i] = rand() & 255;
    if (type == T_BF16) {
        for (int64_t i = 0; i < rows * k; i++) {
            const float v = uniform() * 0.1f;
            uint32_t u; memcpy(&u, &v, 4);
            const uint16_t h = (uint16_t)(u >> 16); /* truncated: any bf16 value will do */
            memcpy(w + 2 * i, &h, 2);
        }
        return w;
    }
    const int bs = dg_type_size(type);
    for (int64_t b = 0; b < rows * rb / bs; b++) {
        uint8_t *blk = w + b * bs;
        uint16_t h = f16(0.01f + 0.01f * (rand() % 7));
        if (type == T_Q6_K) memcpy(blk + 208, &h, 2);
        else if (type == T_MXFP4) blk[0] = 120 + rand() % 8;
        else if (type == T_NVFP4) for (int s = 0; s < 4; s++) blk[s] = (uint8_t)((7 << 3) | (rand() & 7));
        else { /* d first; then Q4_K's and Q5_K's dmin, Q5_1's m */
            memcpy(blk, &h, 2);
            if (type == T_Q4_K || type == T_Q5_K || type == T_Q5_1) memcpy(blk + 2, &h, 2);
        }
    }
    return w;
}

static double rel_diff(const float *x, const float *ref, int64_t count) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < count; i++) num += (x[i] - ref[i]) * (double)(x[i] - ref[i]), den += (double)ref[i] * ref[i];
    return den > 0 ? sqrt(num / den) : INFINITY;
}

static int report(const char *set, int type, const char *what, int rc, int rc_generic, double rel) {
    printf("%-10s type %2d: %-14s rc %d/%d rel diff vs generic %.2e\n", set, type, what, rc, rc_generic, rel);
    return rc != 0 || rc_generic != 0 || !(rel <= 1e-6);
}

int main(void) {
    const int types[] = {T_Q4_0, T_Q5_0, T_Q5_1, T_Q8_0, T_Q4_K, T_Q5_K, T_Q6_K, T_MXFP4, T_NVFP4, T_IQ4_NL, T_IQ4_XS,
                         T_IQ3_S, T_IQ2_S, T_BF16};
#define X(name) &dg_int8_##name,
    const dg_int8_set *sets[] = {SETS};
#undef X
    const int64_t m = 37, k = 512, n = 7, inter = 256;
    srand(1);
    float *a = malloc(m * k * 4), *c0 = malloc(m * k * 4), *c1 = malloc(m * k * 4);
    for (int64_t i = 0; i < m * k; i++) a[i] = uniform();
    /* soft embedding inputs: m rows of logits over n tokens (every row dense), their maxima and exp sums */
    float logits[37 * 7], row_max[37], row_total[37];
    int64_t path[37];
    for (int64_t i = 0; i < m; i++) {
        row_max[i] = -INFINITY, row_total[i] = 0, path[i] = -1;
        for (int64_t j = 0; j < n; j++) logits[i * n + j] = a[i * k + j] * 3, row_max[i] = fmaxf(row_max[i], logits[i * n + j]);
        for (int64_t j = 0; j < n; j++) row_total[i] += expf(logits[i * n + j] - row_max[i]);
    }
    int bad = 0;
    for (size_t t = 0; t < sizeof(types) / sizeof(types[0]); t++) {
        const int type = types[t];
        int64_t rb, grb, drb;
        uint8_t *w = random_rows(type, n, k, &rb), *gate = random_rows(type, inter, k, &grb);
        uint8_t *up = random_rows(type, inter, k, &grb), *down = random_rows(type, k, inter, &drb);
        for (size_t s = 0; s < sizeof(sets) / sizeof(sets[0]); s++) {
            const dg_int8_set *set = sets[s];
            if (!set->supports(type)) {
                printf("%-10s type %2d: not taken\n", set->name, type);
                bad |= type != T_BF16; /* BF16 only on the sets with bfloat16 products */
                continue;
            }
            int rg = dg_int8_generic.linear(a, m, k, type, w, rb, 1.0f, n, c0);
            int rc = set->linear(a, m, k, type, w, rb, 1.0f, n, c1);
            bad |= report(set->name, type, "linear", rc, rg, rel_diff(c1, c0, m * n));
            rg = dg_int8_generic.ffn(a, m, k, inter, NULL, NULL, 1, 1, type, gate, grb, 0, 1.0f, type, up, grb, 0, 1.0f,
                                     type, down, drb, 0, 1.0f, c0);
            rc = set->ffn(a, m, k, inter, NULL, NULL, 1, 1, type, gate, grb, 0, 1.0f, type, up, grb, 0, 1.0f, type, down,
                          drb, 0, 1.0f, c1);
            bad |= report(set->name, type, "dense MLP", rc, rg, rel_diff(c1, c0, m * k));
            /* the soft embedding: the n rows of w as a table of k columns, against m rows of logits over them */
            rg = dg_int8_generic.soft_embed(logits, m, n, row_max, row_total, path, type, w, rb, 1.0f, k, 1.0f, c0);
            rc = set->soft_embed(logits, m, n, row_max, row_total, path, type, w, rb, 1.0f, k, 1.0f, c1);
            bad |= report(set->name, type, "soft embedding", rc, rg, rel_diff(c1, c0, m * k));
        }
        free(w), free(gate), free(up), free(down);
    }
    printf(bad ? "FAIL\n" : "OK\n");
    return bad;
}
