/* The routed layer's elementwise work on CPU, one pass over each token (lorafuse.fast.kernels).

   Between its two GEMMs a routed layer computes, per token and in float32:
     l = softmax(q + b), q = p or |p|           the router's coefficients (N)
     factors: h_r = sum_n u_rn l_n, z_rn = h_r l_n      deltas: z_rn = u_rn l_n
   and in the backward, from gz = dL/dz (R, N):
     factors: gh_r = sum_n gz_rn l_n, gu_rn = gh_r l_n, gl_n = sum_r gz_rn h_r + u_rn gh_r
     deltas:  gu_rn = gz_rn l_n,                         gl_n = sum_r gz_rn u_rn
     gq = l * (gl - <gl, l>) (through the softmax), gp = gq or sign(p) gq, gb = sum_m gq.
   Torch runs each line as its own pass over a (tokens, R, N) tensor, several of them
   broadcasts along a middle dimension; here each token's 2 R N + 2 N numbers stay in
   cache. Layout: rank-major, u_rn at [r * N + n]. Rows may be strided (views of the
   layer's joint GEMM output); the last dimension is contiguous.

   Built with OpenMP (linked to the runtime torch has loaded, so the two share threads)
   the token loops run in parallel, as many threads as torch.set_num_threads gives; the
   results do not depend on the thread count: tokens are independent, and the bias
   gradient is summed per block of tokens, then over the blocks in order. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define PARALLEL 32768 /* elements (M R N) from which a loop runs in parallel, as torch's */
#define AHEAD 4        /* tokens: the backward fetches rows of u this far ahead */

/* exp(x) for x <= 0 (a softmax's shifted scores), in a form compilers vectorise:
   x = k ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-6 polynomial (Cephes' expf
   coefficients), 2^k through the exponent bits; relative error about 2e-7, and exactly
   0 below -87 (where float's normal range ends). */
static inline float lf_exp(float x) {
  float k = floorf(x * 1.44269504f + 0.5f);
  float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  int32_t e = (int32_t)k + 127;
  union {
    int32_t i;
    float f;
  } s;
  s.i = (e > 0 ? e : 0) << 23;
  return x < -87.f ? 0.f : p * s.f;
}

/* Forward for M tokens: l (M, N), h (M, R; factors only, else unused) and z (M, R N),
   all contiguous, from p (rows of stride sp), b (N) and u (rows of stride su). l and h
   may be NULL (inference keeps only z): each token's l then lives on the stack. */
void lf_routed_forward(int64_t M, int64_t R, int64_t N, const float *restrict p, int64_t sp,
                       const float *restrict b, int absolute, const float *restrict u,
                       int64_t su, int factors, float *restrict l, float *restrict h,
                       float *restrict z) {
#pragma omp parallel for schedule(static) if (M * R * N >= PARALLEL)
  for (int64_t m = 0; m < M; m++) {
    const float *restrict pm = p + m * sp;
    const float *restrict um = u + m * su;
    float lstack[N];
    float *restrict lm = l ? l + m * N : lstack;
    float *restrict zm = z + m * R * N;
    if (absolute)
      for (int64_t n = 0; n < N; n++) lm[n] = fabsf(pm[n]) + b[n];
    else
      for (int64_t n = 0; n < N; n++) lm[n] = pm[n] + b[n];
    float mx = lm[0];
#pragma omp simd reduction(max : mx)
    for (int64_t n = 0; n < N; n++) mx = lm[n] > mx ? lm[n] : mx;
    float s = 0.f;
    for (int64_t n = 0; n < N; n++) {
      float e = lf_exp(lm[n] - mx);
      lm[n] = e;
      s += e;
    }
    float inv = 1.f / s;
    for (int64_t n = 0; n < N; n++) lm[n] *= inv;
    for (int64_t r = 0; r < R; r++) {
      const float *restrict ur = um + r * N;
      float *restrict zr = zm + r * N;
      if (factors) {
        float acc = 0.f;
        for (int64_t n = 0; n < N; n++) acc += ur[n] * lm[n];
        if (h) h[m * R + r] = acc;
        for (int64_t n = 0; n < N; n++) zr[n] = acc * lm[n];
      } else {
        for (int64_t n = 0; n < N; n++) zr[n] = ur[n] * lm[n];
      }
    }
  }
}

/* Backward for M tokens: writes row m of G (stride sG) as [g_m (O) ; gu_m (R N) ; gp_m (N)],
   so that one GEMM G @ [W ; A ; P] gives the input's gradient, and sets gb (N) to the
   sum of gq over the tokens. g (M, O) and gz (M, R N) contiguous; u and p as in the
   forward (p only read when absolute); part is scratch of ceil(M / block) * N floats. */
void lf_routed_backward(int64_t M, int64_t R, int64_t N, int64_t O, const float *restrict g,
                        const float *restrict gz, const float *restrict u, int64_t su,
                        const float *restrict l, const float *restrict h,
                        const float *restrict p, int64_t sp, int absolute, int factors,
                        float *restrict G, int64_t sG, float *restrict gb, int64_t block,
                        float *restrict part) {
  int64_t blocks = (M + block - 1) / block;
#pragma omp parallel for schedule(static) if (M * R * N >= PARALLEL)
  for (int64_t k = 0; k < blocks; k++) {
    float gl[N];
    float *restrict pk = part + k * N;
    for (int64_t n = 0; n < N; n++) pk[n] = 0.f;
    int64_t stop = (k + 1) * block < M ? (k + 1) * block : M;
    for (int64_t m = k * block; m < stop; m++) {
      const float *restrict gzm = gz + m * R * N;
      const float *restrict um = u + m * su;
      const float *restrict lm = l + m * N;
      float *restrict Gm = G + m * sG;
      if (m + AHEAD < M) /* written in the forward, long out of cache by now */
        for (int64_t i = 0; i < R * N; i += 16) __builtin_prefetch(um + AHEAD * su + i, 0, 0);
      memcpy(Gm, g + m * O, (size_t)O * sizeof(float));
      float *restrict gum = Gm + O;
      float *restrict gpm = Gm + O + R * N;
      for (int64_t n = 0; n < N; n++) gl[n] = 0.f;
      for (int64_t r = 0; r < R; r++) {
        const float *restrict gzr = gzm + r * N;
        const float *restrict ur = um + r * N;
        float *restrict gur = gum + r * N;
        if (factors) {
          float hr = h[m * R + r], gh = 0.f;
          for (int64_t n = 0; n < N; n++) gh += gzr[n] * lm[n];
          for (int64_t n = 0; n < N; n++) {
            gur[n] = gh * lm[n];
            gl[n] += gzr[n] * hr + ur[n] * gh;
          }
        } else {
          for (int64_t n = 0; n < N; n++) {
            gur[n] = gzr[n] * lm[n];
            gl[n] += gzr[n] * ur[n];
          }
        }
      }
      float dot = 0.f;
      for (int64_t n = 0; n < N; n++) dot += gl[n] * lm[n];
      for (int64_t n = 0; n < N; n++) {
        float gq = lm[n] * (gl[n] - dot);
        pk[n] += gq;
        gpm[n] = gq;
      }
      if (absolute) {
        const float *restrict pm = p + m * sp;
        for (int64_t n = 0; n < N; n++)
          gpm[n] = pm[n] > 0.f ? gpm[n] : (pm[n] < 0.f ? -gpm[n] : 0.f);
      }
    }
  }
  for (int64_t n = 0; n < N; n++) gb[n] = 0.f;
  for (int64_t k = 0; k < blocks; k++)
    for (int64_t n = 0; n < N; n++) gb[n] += part[k * N + n];
}
