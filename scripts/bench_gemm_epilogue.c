/* A C model of the W4A8 nibble GEMM's inner loop (agile_tvm/kernels/schedule.py, grouped form) on AVX2, to see
 * what its per-group float epilogue costs: one row x 4 output tiles of 8, groups of 32 k, the panel's decoded
 * int8 weights in L1. Build and run: bash scripts/bench_gemm_epilogue.sh (gcc -O3 -march=native).
 *
 * Per group and tile the dot is 8 vpmaddubsw + 7 vpaddw + 1 vpmaddwd; the epilogue variants are
 *   full:           cvt, FMA (-zp * sum q), FMA (* wscale), FMA (wmin * xsum)   - what agile-tvm runs
 *   zp per row:     cvt, FMA (* wscale), FMA (wmin * xsum); -zp * sum_g(sum q * ws) once per row
 *   one FMA:        cvt, FMA (* wscale)                                          - per-channel-like lower bound
 *   none:           integer sums only
 *   row start:      cvt, FMA (* wscale); offsets and the zero-point term once per row, before the group loop
 *                   (tried in session 6: faster, but ~25x the float error; not kept, BENCHMARKS.md)
 *   zp per group, offsets after: cvt, FMA (-zp * sum q), FMA (* wscale); offsets once per row
 * and a port check: vpmaddubsw, vpmaddwd and vfmadd231ps each issue 2 per cycle, and mixed they still total
 * 2 per cycle (Zen 3: the same two FP pipes), while vpaddw adds without slowing them. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define K 576
#define G (K / 32)
#define M 512
#define NT 4
static int8_t W[G][8][NT][32] __attribute__((aligned(64)));
static float wscale[G][NT][8], wsum0[G][NT][8], wmin[G][NT][8], zc[NT][8];
static uint8_t X[M][K] __attribute__((aligned(64)));
static float zpf[M], xsumf[M][G], out[M][NT * 8];

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static inline __m256i bc(const uint8_t *p) { return _mm256_set1_epi32(*(const int *)p); }
static inline __m256i dot8(const uint8_t *a, int g, int t) { /* 8 pmaddubsw summed in int16 (|q| <= 8), 1 pmaddwd */
  __m256i p[8];
  for (int j = 0; j < 8; j++) p[j] = _mm256_maddubs_epi16(bc(a + 4 * j), _mm256_load_si256((const __m256i *)W[g][j][t]));
  __m256i s = _mm256_add_epi16(_mm256_add_epi16(_mm256_add_epi16(p[0], p[1]), _mm256_add_epi16(p[2], p[3])),
                               _mm256_add_epi16(_mm256_add_epi16(p[4], p[5]), _mm256_add_epi16(p[6], p[7])));
  return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
}
enum { FULL, ZP_PER_ROW, ONE_FMA, NONE, WMIN_AFTER, FULL_WMIN_AFTER };
static void run(int variant) {
  for (int i = 0; i < M; i++) {
    __m256 f[NT], nzp = _mm256_set1_ps(-zpf[i]);
    __m256i d32[NT];
    for (int t = 0; t < NT; t++) { f[t] = _mm256_setzero_ps(); d32[t] = _mm256_setzero_si256(); }
    for (int g = 0; g < G; g++) {
      const uint8_t *a = X[i] + g * 32;
      __m256 xs = _mm256_set1_ps(xsumf[i][g]);
      for (int t = 0; t < NT; t++) {
        __m256i d = dot8(a, g, t);
        if (variant == NONE) { d32[t] = _mm256_add_epi32(d32[t], d); continue; }
        __m256 c = _mm256_cvtepi32_ps(d);
        if (variant == FULL || variant == FULL_WMIN_AFTER) c = _mm256_fmadd_ps(nzp, _mm256_load_ps(wsum0[g][t]), c);
        f[t] = _mm256_fmadd_ps(c, _mm256_load_ps(wscale[g][t]), f[t]);
        if (variant != ONE_FMA && variant != WMIN_AFTER && variant != FULL_WMIN_AFTER) f[t] = _mm256_fmadd_ps(_mm256_load_ps(wmin[g][t]), xs, f[t]);
      }
    }
    if (variant == WMIN_AFTER || variant == FULL_WMIN_AFTER)
      for (int g = 0; g < G; g++) { __m256 xs = _mm256_set1_ps(xsumf[i][g]);
        for (int t = 0; t < NT; t++) f[t] = _mm256_fmadd_ps(_mm256_load_ps(wmin[g][t]), xs, f[t]); }
    for (int t = 0; t < NT; t++) {
      if (variant == ZP_PER_ROW || variant == WMIN_AFTER) f[t] = _mm256_fmadd_ps(nzp, _mm256_load_ps(zc[t]), f[t]);
      if (variant == NONE) f[t] = _mm256_castsi256_ps(d32[t]);
      _mm256_storeu_ps(out[i] + 8 * t, f[t]);
    }
  }
}
#define PORTS(name, a, b) { double t0 = now(); for (long i = 0; i < 20000000L; i++) __asm__ volatile( \
  a " %%ymm15,%%ymm14,%%ymm0\n\t" b " %%ymm15,%%ymm14,%%ymm1\n\t" a " %%ymm15,%%ymm14,%%ymm2\n\t" \
  b " %%ymm15,%%ymm14,%%ymm3\n\t" a " %%ymm15,%%ymm14,%%ymm4\n\t" b " %%ymm15,%%ymm14,%%ymm5\n\t" \
  a " %%ymm15,%%ymm14,%%ymm6\n\t" b " %%ymm15,%%ymm14,%%ymm7" ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", \
  "xmm5", "xmm6", "xmm7"); printf("  %-26s %.2f ns per 8 instructions\n", name, (now() - t0) / 2e7 * 1e9); }
int main(void) {
  srand(1);
  for (size_t i = 0; i < sizeof W; i++) ((int8_t *)W)[i] = rand() % 16 - 8;
  for (size_t i = 0; i < sizeof X; i++) ((uint8_t *)X)[i] = rand();
  for (int g = 0; g < G; g++) for (int t = 0; t < NT; t++) for (int l = 0; l < 8; l++) {
    wscale[g][t][l] = 0.01f; wsum0[g][t][l] = 3; wmin[g][t][l] = -0.05f; zc[t][l] = 0.5f; }
  for (int i = 0; i < M; i++) { zpf[i] = 120; for (int g = 0; g < G; g++) xsumf[i][g] = 10; }
  printf("independent instructions, 8 per iteration (lower is faster; same time = separate pipes):\n");
  PORTS("vpmaddubsw x8", "vpmaddubsw", "vpmaddubsw") PORTS("vfmadd231ps x8", "vfmadd231ps", "vfmadd231ps")
  PORTS("4 vpmaddubsw + 4 vfmadd", "vpmaddubsw", "vfmadd231ps") PORTS("4 vpmaddubsw + 4 vpmaddwd", "vpmaddubsw", "vpmaddwd")
  PORTS("4 vpmaddubsw + 4 vpaddw", "vpmaddubsw", "vpaddw")
  const char *names[] = {"full epilogue (3 FMA)", "zero point per row (2 FMA)", "one FMA", "no epilogue", "row start (not kept)", "zp per group, offsets after"};
  printf("GEMM model, one core, M=%d K=%d, 32 outputs (best of 200):\n", M, K);
  for (int v = 0; v < 6; v++) {
    double best = 1e9;
    for (int r = 0; r < 200; r++) { double t0 = now(); run(v); double t = now() - t0; if (t < best) best = t; }
    printf("  %-28s %6.1f GMAC/s\n", names[v], (double)M * K * NT * 8 / best / 1e9);
  }
  return out[3][5] == 12345.0f;
}
