// What the CPU kernels share: float32 vectors, bfloat16 widening, and the thread pool loop.
#pragma once
#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace pass_jax {

typedef float v16 __attribute__((vector_size(64)));

inline v16 load_w(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline v16 load_w(const uint16_t* p) {  // 16 bfloat16 -> 16 float32: the high half of each word
  typedef uint16_t u16x16 __attribute__((vector_size(32)));
  typedef uint32_t u32x16 __attribute__((vector_size(64)));
  u16x16 h;
  std::memcpy(&h, p, sizeof(h));
  u32x16 wide = __builtin_convertvector(h, u32x16) << 16;
  v16 v;
  std::memcpy(&v, &wide, sizeof(v));
  return v;
}

inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// 32 bfloat16 (64 bytes) as float32, exactly: each 32-bit lane holds the pair (p[2i], p[2i+1]); a
// shift left by 16 gives p[2i] (even), a mask of the low half p[2i+1] (odd). 1 load and 2 integer
// ops per 32 values, where widening 16 takes a half-line load, a zero extension and a shift.
inline void load_pairs(const uint16_t* p, __m512& even, __m512& odd) {
  const __m512i pairs = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(int(0xffff0000u))));
}

// The inverse order on store: out[2i] = even[i], out[2i + 1] = odd[i], 32 floats.
inline void store_interleaved(float* out, __m512 even, __m512 odd) {
  const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  _mm512_storeu_ps(out, _mm512_permutex2var_ps(even, first, odd));
  _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(even, second, odd));
}

// exp(x) in float32 lanes (Cephes' polynomial after a two-step ln 2 reduction; ~1 ulp).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// Lane j of the result is the sum of the 16 lanes of v[kSlot[j]] (a shuffle-and-add tree: ~3
// instructions per sum, where reducing each vector alone takes ~9). kSlot is its own inverse.
constexpr int kSlot[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
inline __m512 sum_each(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], 0x88), _mm512_shuffle_f32x4(a[i], a[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i) c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[i], b[i + 2]), _mm512_unpackhi_ps(b[i], b[i + 2]));
  return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x44), _mm512_shuffle_ps(c[0], c[1], 0xEE));
}

struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Chunks [0, chunks) are claimed from a shared counter by the calling thread and by helpers
// scheduled on XLA's intra-op pool; the caller never waits for a helper to start, only for
// chunks already claimed.
template <typename F>
void parallel_chunks(ffi::ThreadPool& pool, int64_t chunks, F chunk) {
  auto work = std::make_shared<Work>();
  auto body = [=](Work& s) {
    for (int64_t c; (c = s.next.fetch_add(1)) < chunks;) {
      chunk(c);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work, body] { body(*work); });
  body(*work);
  while (work->done.load(std::memory_order_acquire) < chunks) __builtin_ia32_pause();
}

}  // namespace pass_jax
