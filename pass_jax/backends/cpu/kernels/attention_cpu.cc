// Decode attention of one layer on the CPU, as one XLA FFI call: rows [B, KV, R, hd] (the T x
// groups queries of each KV head, rows ordered (t, group)) over the whole cache buffer
// keys / values [B, S, KV, hd], where mask [B, T, S] says which entries row t sees.
//
// Why: as a dozen small XLA ops per layer (products, mask, softmax, transposes) a decode pass's
// attention cost SmolLM2 ~6 ms of a ~21 ms step at T = 1, almost all per-op overhead: the work
// itself is a few hundred thousand multiply-adds per layer.
//
// Returns out [B, KV, R, hd] float32 and stats [B, KV, R, 2] = (max score, sum of exp(score - max))
// over the seen entries, which is what folding further keys into the softmax needs.
//
// A deep look-ahead's prefix keys / values [P, KV, hd] (P may be 0) join the softmax of the rows of
// the tokens t where prefix_rows [B, T] is true (the look-ahead rows), after the buffer's entries;
// every other row computes exactly what it computes without a prefix. Folding it in here replaced
// half a dozen small XLA ops per layer of every PaSS pass.
//
// Every number a row computes depends only on its query, the entries it sees and their buffer
// positions: sums over entries run in one order over the buffer in 16-entry blocks (unseen
// entries add exact zeros), whatever T, the buffer length S or the other rows. So a token
// attends bit for bit alike in a 1-token and a many-token pass.
#include <cmath>
#include <type_traits>

#include "common.h"

namespace {
using namespace pass_jax;

inline __m512 round_to(__m512 v, float) { return v; }
inline __m512 round_to(__m512 v, uint16_t) {  // float32 -> bfloat16 (nearest even) -> float32
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
  return _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(int(0xffff0000u))));
}

// A cache entry's hd values as NV float32 vectors. bfloat16 entries load 32 values per 64 bytes,
// split into even dims (shift) and odd dims (mask) as in dense_cpu.cc; queries are split the same
// way once per row, and outputs merged back to natural order once per row.
template <int NV>
inline void load_entry(const float* e, __m512* out) {
  for (int c = 0; c < NV; ++c) out[c] = _mm512_loadu_ps(e + 16 * c);
}
template <int NV>
inline void load_entry(const uint16_t* e, __m512* out) {
  for (int c = 0; c < NV / 2; ++c) load_pairs(e + 32 * c, out[2 * c], out[2 * c + 1]);
}
template <int NV>
inline void split(const float* q, __m512* out, float) { load_entry<NV>(q, out); }
template <int NV>
inline void split(const float* q, __m512* out, uint16_t) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int c = 0; c < NV / 2; ++c) {
    const __m512 a = _mm512_loadu_ps(q + 32 * c), b = _mm512_loadu_ps(q + 32 * c + 16);
    out[2 * c] = _mm512_permutex2var_ps(a, even, b);
    out[2 * c + 1] = _mm512_permutex2var_ps(a, odd, b);
  }
}
template <int NV>
inline void store_merged(float* o, const __m512* acc, float) {
  for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + 16 * c, acc[c]);
}
template <int NV>
inline void store_merged(float* o, const __m512* acc, uint16_t) {
  for (int c = 0; c < NV / 2; ++c) store_interleaved(o + 32 * c, acc[2 * c], acc[2 * c + 1]);
}

struct Shape {
  int64_t B, KV, R, T, S, groups, P;
};

constexpr int64_t kMaxPrefix = 64;

// One call's buffers; C is the cache's element type (float or bfloat16 bits).
template <typename C>
struct Buffers {
  const float* rows;
  const C *keys, *values;
  const bool* mask;
  const C *pkeys, *pvalues;  // the deep prefix [P, KV, hd]
  const bool* prefix_rows;
  float *out, *stats;
};

// q . entry as 16 lane partial sums (the lanes of an entry's NV vectors, summed in one order).
template <int NV, typename C>
inline __m512 products(const __m512* qv, const C* e) {
  __m512 k[NV];
  load_entry<NV>(e, k);
  __m512 acc = _mm512_mul_ps(qv[0], k[0]);
  for (int c = 1; c < NV; ++c) acc = _mm512_fmadd_ps(qv[c], k[c], acc);
  return acc;
}

// Rows [r0, r1) of head (b, h), NV = hd / 16. probs is scratch of (r1 - r0) x S16 floats for the
// buffer's entries, then (r1 - r0) x kMaxPrefix for the prefix's.
template <int NV, typename C>
void attend(const Shape& d, const Buffers<C>& io, int64_t b, int64_t h, int64_t r0, int64_t r1, float* probs,
            int64_t S16) {
  const auto [rows, keys, values, mask, pkeys, pvalues, prefix_rows, out, stats] = io;
  constexpr int64_t hd = 16 * NV;
  const float scale = 1.0f / std::sqrt(float(hd));
  const int64_t entry = d.KV * hd;  // stride between cache entries
  const C* kh = keys + (b * d.S * d.KV + h) * hd;
  const C* vh = values + (b * d.S * d.KV + h) * hd;
  const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
  const __m512i kLane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t r = r0; r < r1; ++r) {
    const float* q = rows + ((b * d.KV + h) * d.R + r) * hd;
    const bool* seen = mask + (b * d.T + r / d.groups) * d.S;
    float* p = probs + (r - r0) * S16;
    __m512 qv[NV];
    split<NV>(q, qv, C{});
    float top = -INFINITY;
    for (int64_t j0 = 0; j0 < S16; j0 += 16) {  // 16 entries at a time, each one dot product
      const __mmask16 inside = j0 + 16 <= d.S ? __mmask16(0xffff) : __mmask16((1u << (d.S - j0)) - 1);
      const __mmask16 live = _mm_test_epi8_mask(_mm_maskz_loadu_epi8(inside, seen + j0), _mm_set1_epi8(1));
      if (!live) {
        _mm512_storeu_ps(p + j0, minus_inf);
        continue;
      }
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t j = std::min(j0 + kSlot[i], d.S - 1);  // past the buffer: any entry, masked below
        acc[i] = products<NV>(qv, kh + j * entry);
      }
      const __m512 scores = _mm512_mask_mov_ps(minus_inf, live, _mm512_mul_ps(sum_each(acc), _mm512_set1_ps(scale)));
      _mm512_storeu_ps(p + j0, scores);
      top = std::max(top, _mm512_reduce_max_ps(scores));
    }
    const bool with_prefix = d.P > 0 && prefix_rows[b * d.T + r / d.groups];
    float* pp = probs + (r1 - r0) * S16 + (r - r0) * kMaxPrefix;  // the prefix's scores, then weights
    if (with_prefix)
      for (int64_t i = 0; i < d.P; ++i) {
        pp[i] = _mm512_reduce_add_ps(products<NV>(qv, pkeys + (i * d.KV + h) * hd)) * scale;
        top = std::max(top, pp[i]);
      }
    const bool none = top == -INFINITY;  // sees nothing: XLA's -1e30 fill makes that uniform
    if (none)
      for (int64_t j = 0; j < S16; ++j) p[j] = j < d.S ? 0.f : -INFINITY;
    const __m512 topv = _mm512_set1_ps(none ? 0.f : top);
    // The sum of the seen entries' weights, as if they sat side by side: the i-th seen entry adds into
    // lane i mod 16. A tree node sees its ancestors across slots its siblings hold, a 1-token step
    // the same entries side by side; summed by slot lane, the two rounded differently.
    __m512 lanes = _mm512_setzero_ps();
    unsigned fill = 0;
    for (int64_t j = 0; j < S16; j += 16) {
      const __m512 s = _mm512_loadu_ps(p + j);
      const __mmask16 live = _mm512_cmp_ps_mask(s, minus_inf, _CMP_NEQ_OQ);
      const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(s, topv)));
      _mm512_storeu_ps(p + j, e);
      const __m512i to = _mm512_and_si512(_mm512_sub_epi32(kLane, _mm512_set1_epi32(int(fill))), _mm512_set1_epi32(15));
      lanes = _mm512_add_ps(lanes, _mm512_permutexvar_ps(to, _mm512_maskz_compress_ps(live, e)));
      fill = (fill + unsigned(__builtin_popcount(live))) & 15u;
    }
    float sum = _mm512_reduce_add_ps(lanes);
    if (with_prefix) {
      for (int64_t i = 0; i < d.P; ++i) pp[i] = std::exp(pp[i] - top);
      for (int64_t i = 0; i < d.P; ++i) sum += pp[i];
      for (int64_t i = 0; i < d.P; ++i)
        pp[i] = _mm512_cvtss_f32(round_to(_mm512_set1_ps(pp[i] / sum), C{}));
    }
    for (int64_t j = 0; j < S16; j += 16)
      _mm512_storeu_ps(p + j, round_to(_mm512_div_ps(_mm512_loadu_ps(p + j), _mm512_set1_ps(sum)), C{}));
    float* st = stats + ((b * d.KV + h) * d.R + r) * 2;
    st[0] = none ? -1e30f : top;
    st[1] = sum;
  }
  // out = probs @ values: each value vector loaded once feeds every row of the block.
  constexpr int RT = 24 / NV;
  for (int64_t t0 = r0; t0 < r1; t0 += RT) {
    const int rt = int(std::min<int64_t>(RT, r1 - t0));
    __m512 acc[RT][NV];
    for (int m = 0; m < RT; ++m)
      for (int i = 0; i < NV; ++i) acc[m][i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < d.S; ++j) {
      bool any = false;
      for (int m = 0; m < rt; ++m) any |= probs[(t0 - r0 + m) * S16 + j] != 0.f;
      if (!any) continue;
      __m512 vv[NV];
      load_entry<NV>(vh + j * entry, vv);
      for (int m = 0; m < rt; ++m) {
        const __m512 pm = _mm512_set1_ps(probs[(t0 - r0 + m) * S16 + j]);
        for (int i = 0; i < NV; ++i) acc[m][i] = _mm512_fmadd_ps(pm, vv[i], acc[m][i]);
      }
    }
    for (int m = 0; m < rt; ++m) {
      if (d.P > 0 && prefix_rows[b * d.T + (t0 + m) / d.groups]) {
        const float* pp = probs + (r1 - r0) * S16 + (t0 + m - r0) * kMaxPrefix;
        for (int64_t i = 0; i < d.P; ++i) {
          __m512 vv[NV];
          load_entry<NV>(pvalues + (i * d.KV + h) * hd, vv);
          const __m512 pm = _mm512_set1_ps(pp[i]);
          for (int c = 0; c < NV; ++c) acc[m][c] = _mm512_fmadd_ps(pm, vv[c], acc[m][c]);
        }
      }
      store_merged<NV>(out + ((b * d.KV + h) * d.R + t0 + m) * hd, acc[m], C{});
    }
  }
}

template <int NV, typename C>
void run(ffi::ThreadPool& pool, const Shape& d, const Buffers<C>& io) {
  constexpr int64_t kRowsPerChunk = 24 / NV;
  const int64_t blocks = (d.R + kRowsPerChunk - 1) / kRowsPerChunk;
  const int64_t S16 = (d.S + 15) / 16 * 16;
  parallel_chunks(pool, d.B * d.KV * blocks, [&, S16](int64_t c) {
    const int64_t bh = c / blocks, r0 = c % blocks * kRowsPerChunk;
    std::unique_ptr<float[]> probs(new float[kRowsPerChunk * (S16 + kMaxPrefix)]);
    attend<NV>(d, io, bh / d.KV, bh % d.KV, r0, std::min(d.R, r0 + kRowsPerChunk), probs.get(), S16);
  });
}

template <typename C>
ffi::Error dispatch(ffi::ThreadPool& pool, const Shape& d, int64_t hd, const Buffers<C>& io) {
  switch (hd) {
    case 32: run<2>(pool, d, io); break;
    case 64: run<4>(pool, d, io); break;
    case 128: run<8>(pool, d, io); break;
    default: return ffi::Error::InvalidArgument("pass_jax_attention: head_dim must be 32, 64 or 128");
  }
  return ffi::Error::Success();
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::AnyBuffer rows, ffi::AnyBuffer keys, ffi::AnyBuffer values,
                     ffi::AnyBuffer mask, ffi::AnyBuffer pkeys, ffi::AnyBuffer pvalues, ffi::AnyBuffer prefix_rows,
                     ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> stats) {
  const auto rd = rows.dimensions(), kd = keys.dimensions(), md = mask.dimensions(), pd = pkeys.dimensions(),
             prd = prefix_rows.dimensions();
  if (rd.size() != 4 || kd.size() != 4 || md.size() != 3 || rows.element_type() != ffi::DataType::F32 ||
      mask.element_type() != ffi::DataType::PRED || keys.element_type() != values.element_type() ||
      kd[0] != rd[0] || kd[2] != rd[1] || kd[3] != rd[3] || md[0] != rd[0] || md[2] != kd[1] || rd[2] % md[1])
    return ffi::Error::InvalidArgument("pass_jax_attention: want rows [B, KV, R, hd], keys/values [B, S, KV, hd], mask [B, T, S]");
  if (pd.size() != 3 || pkeys.element_type() != keys.element_type() || pvalues.element_type() != keys.element_type() ||
      pvalues.element_count() != pkeys.element_count() || pd[0] > kMaxPrefix || pd[1] != kd[2] || pd[2] != kd[3] || prd.size() != 2 ||
      prd[0] != md[0] || prd[1] != md[1] || prefix_rows.element_type() != ffi::DataType::PRED)
    return ffi::Error::InvalidArgument("pass_jax_attention: want prefix keys/values [P <= 64, KV, hd] like the cache, prefix_rows [B, T]");
  const Shape d{rd[0], rd[1], rd[2], md[1], kd[1], rd[2] / md[1], pd[0]};
  auto buffers = [&](auto element) {  // element: std::type_identity of the cache's element type
    using C = typename decltype(element)::type;
    auto cache = [](const ffi::AnyBuffer& x) { return reinterpret_cast<const C*>(x.untyped_data()); };
    auto pred = [](const ffi::AnyBuffer& x) { return reinterpret_cast<const bool*>(x.untyped_data()); };
    return Buffers<C>{rows.typed_data<float>(), cache(keys), cache(values), pred(mask), cache(pkeys), cache(pvalues),
                      pred(prefix_rows), out->typed_data<float>(), stats->typed_data<float>()};
  };
  if (keys.element_type() == ffi::DataType::F32) return dispatch(pool, d, rd[3], buffers(std::type_identity<float>{}));
  if (keys.element_type() == ffi::DataType::BF16) return dispatch(pool, d, rd[3], buffers(std::type_identity<uint16_t>{}));
  return ffi::Error::InvalidArgument("pass_jax_attention: the cache must be float32 or bfloat16");
}


}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PassJaxAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
