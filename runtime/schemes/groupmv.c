/*
 * The group scheme's 4-bit rows times one vector, without dequantising them first: the
 * decode executor's matrix-vector products on 4-bit shards and table rows
 * (runtime/schemes/groupmv.py loads this library with ctypes; runtime/schemes/group.py
 * documents the layout).
 *
 * A block's row r is code bytes (byte j: column 2j in the low nibble, 2j+1 in the high)
 * at codes + r * code_stride, then, at side + r * side_stride, its G = cols / 32 fp16
 * steps s_g and G fp16 minima m_g. Its weights are w = m_g + u s_g, and
 *
 *     y[r] = sum_g (s_g sum_{j in g} u_j x_j + m_g sum_{j in g} x_j)
 *
 * which is sum_c w[r, c] x[c] with the sums taken in another order than decoding w then
 * torch.mv does (the two agree to float rounding). fp32 throughout; the group sums of x
 * and x split into even and odd columns are computed once per call into `work` (cols +
 * G floats), so that the inner loop over a group is 16 code bytes against 16 + 16
 * contiguous floats, which the compiler vectorises. cols must be a multiple of 32.
 *
 * No Python API: a plain shared library (built by setuptools as the extension
 * runtime._groupmv, pyproject.toml), its one function called through ctypes, which
 * releases the GIL while it runs (the IO thread keeps reading).
 */
#include <stdint.h>
#include <string.h>

#if defined(__FLT16_MAX__)
static inline float half_to_float(const uint8_t *p) {
    _Float16 h;
    memcpy(&h, p, 2);
    return (float)h;
}
#else
static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    float f;
    if (exp == 0) { /* zero or subnormal: man x 2^-24, exact in fp32 */
        f = (float)man * (1.0f / 16777216.0f);
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    memcpy(&f, &bits, 4);
    return f;
}
#endif

/* One build for every x86-64 machine: a copy per instruction set, chosen at load time. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* y[r] = (accumulate ? y[r] : 0) + sum_c w[r, c] x[c] for r < rows, 4-bit group rows. */
CLONES
void group4_mv(const uint8_t *codes, int64_t code_stride, const uint8_t *side,
               int64_t side_stride, const float *x, float *y, int64_t rows, int64_t cols,
               int accumulate, float *work) {
    const int64_t G = cols / 32, half = cols / 2;
    float *xe = work, *xo = work + half, *xs = work + cols;
    for (int64_t c = 0; c < half; c++) {
        xe[c] = x[2 * c];
        xo[c] = x[2 * c + 1];
    }
    for (int64_t g = 0; g < G; g++) {
        float s = 0.0f;
        for (int j = 0; j < 32; j++)
            s += x[32 * g + j];
        xs[g] = s;
    }
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *b = codes + r * code_stride, *sd = side + r * side_stride;
        float acc[16] = {0}, low = 0.0f;
        for (int64_t g = 0; g < G; g++) {
            const float s = half_to_float(sd + 2 * g), m = half_to_float(sd + 2 * (G + g));
            const uint8_t *q = b + 16 * g;
            const float *e = xe + 16 * g, *o = xo + 16 * g;
            for (int j = 0; j < 16; j++)
                acc[j] += s * ((float)(q[j] & 15) * e[j] + (float)(q[j] >> 4) * o[j]);
            low += m * xs[g];
        }
        float t = 0.0f;
        for (int j = 0; j < 16; j++)
            t += acc[j];
        t += low;
        y[r] = accumulate ? y[r] + t : t;
    }
}
