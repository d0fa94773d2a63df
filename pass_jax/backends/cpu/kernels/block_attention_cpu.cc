// Training's look-ahead attention on the CPU, forward and gradient, as XLA FFI calls.
//
// Each look-ahead row (b, t, head h) attends, in one softmax, to
//   * the real tokens' cache keys/values [B, S, KV, hd] where visible [B, T, S] (a constant: the
//     real tokens' pass has no gradient),
//   * its own block's entries local keys/values [B, T, KV, hd]: the T rows are T / n blocks of n
//     and row t sees the entries of its block up to itself,
//   * the P learned prefix entries prefix [2, P, KV, hd] (deep look-ahead) where prefix_rows [B, T].
// q and out are [B, T, H, hd] (the layout the products use), H = KV x groups.
//
// Why: as XLA ops this is a dozen products, softmax passes and transposes per layer (rows into
// [B, KV, R, hd] and back, the prefix batched over KV heads), each a pass over a few MB at XLA's
// elementwise speed: ~20% of SmolLM2's training step, for a few GFLOP of work.
//
// The forward returns out and lse = log sum exp(scores) per row; the gradient recomputes the
// scores and, with p = exp(score - lse) and D = g . out, ds = p (g . v - D) per entry:
//   dq = scale sum ds k,  d local k_j (d prefix k_j) += scale ds_j q,  d local v_j (d prefix v_j) += p_j g.
// Work is cut into (b, block) chunks: a block's local entries are only seen by its own rows, so
// each chunk owns their gradients; it writes its prefix gradient to its own slot of a [chunks, ...]
// array that the caller sums. Float32 only (training's dtype; bfloat16 runs take XLA's ops).
#include <cmath>

#include "common.h"

namespace {
using namespace pass_jax;

struct Dims {
  int64_t B, T, H, KV, S, P, n, hd;
  int64_t groups() const { return H / KV; }
};

struct Inputs {
  const float *q, *keys, *values, *local_k, *local_v, *prefix;
  const bool *visible, *prefix_rows;
};

template <int NV>
inline void load(const float* p, __m512* v) {
  for (int c = 0; c < NV; ++c) v[c] = _mm512_loadu_ps(p + 16 * c);
}

template <int NV>
inline float dot(const __m512* a, const float* b) {
  __m512 acc = _mm512_mul_ps(a[0], _mm512_loadu_ps(b));
  for (int c = 1; c < NV; ++c) acc = _mm512_fmadd_ps(a[c], _mm512_loadu_ps(b + 16 * c), acc);
  return _mm512_reduce_add_ps(acc);
}

template <int NV>
inline void axpy(float w, const float* x, __m512* acc) {
  const __m512 wv = _mm512_set1_ps(w);
  for (int c = 0; c < NV; ++c) acc[c] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + 16 * c), acc[c]);
}

template <int NV>
inline void axpy_to(float w, const __m512* x, float* acc) {  // acc (memory) += w x
  const __m512 wv = _mm512_set1_ps(w);
  for (int c = 0; c < NV; ++c) _mm512_storeu_ps(acc + 16 * c, _mm512_fmadd_ps(wv, x[c], _mm512_loadu_ps(acc + 16 * c)));
}

// a . e_j for the 16 entries e_j = base + j * entry from j0, lanes in entry order (one shuffle-and-add
// tree, `sum_each`); lanes past S repeat the last entry and are masked by the caller.
template <int NV>
inline __m512 dots16(const __m512* a, const float* base, int64_t entry, int64_t j0, int64_t S) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) {
    const float* e = base + std::min(j0 + kSlot[i], S - 1) * entry;
    acc[i] = _mm512_mul_ps(a[0], _mm512_loadu_ps(e));
    for (int c = 1; c < NV; ++c) acc[i] = _mm512_fmadd_ps(a[c], _mm512_loadu_ps(e + 16 * c), acc[i]);
  }
  return sum_each(acc);
}

// The scores of row (b, t, h) against every entry it sees, times scale: the cache's in cache[S16]
// (-inf where unseen, 16 entries per dot-product tree as in attention_cpu.cc), its block's in
// local[n] (slots after t: -inf), the prefix's in pre[P] (-inf where the row does not see it).
// Returns the max.
template <int NV>
float scores(const Dims& d, const Inputs& in, int64_t b, int64_t t, int64_t h, const __m512* qv, float* cache,
             float* local, float* pre) {
  constexpr int64_t hd = 16 * NV;
  const float scale = 1.0f / std::sqrt(float(hd));
  const int64_t kv = h / d.groups(), entry = d.KV * hd, S16 = (d.S + 15) / 16 * 16;
  const float* kh = in.keys + (b * d.S * d.KV + kv) * hd;
  const bool* seen = in.visible + (b * d.T + t) * d.S;
  const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
  float top = -INFINITY;
  for (int64_t j0 = 0; j0 < S16; j0 += 16) {
    const __mmask16 inside = j0 + 16 <= d.S ? __mmask16(0xffff) : __mmask16((1u << (d.S - j0)) - 1);
    const __mmask16 live = _mm_test_epi8_mask(_mm_maskz_loadu_epi8(inside, seen + j0), _mm_set1_epi8(1));
    if (!live) {
      _mm512_storeu_ps(cache + j0, minus_inf);
      continue;
    }
    const __m512 s =
        _mm512_mask_mov_ps(minus_inf, live, _mm512_mul_ps(dots16<NV>(qv, kh, entry, j0, d.S), _mm512_set1_ps(scale)));
    _mm512_storeu_ps(cache + j0, s);
    top = std::max(top, _mm512_reduce_max_ps(s));
  }
  const int64_t first = t / d.n * d.n;
  for (int64_t j = 0; j < d.n; ++j) {
    local[j] = first + j <= t ? scale * dot<NV>(qv, in.local_k + ((b * d.T + first + j) * d.KV + kv) * hd) : -INFINITY;
    top = std::max(top, local[j]);
  }
  const bool sees_prefix = in.prefix_rows[b * d.T + t];
  for (int64_t j = 0; j < d.P; ++j) {
    pre[j] = sees_prefix ? scale * dot<NV>(qv, in.prefix + (j * d.KV + kv) * hd) : -INFINITY;
    top = std::max(top, pre[j]);
  }
  return top;
}


// Chunk (b, block): the n rows of one block, every head. scratch: S16 + n + P floats.
template <int NV>
void forward_chunk(const Dims& d, const Inputs& in, float* out, float* lse, int64_t b, int64_t blk, float* scratch) {
  constexpr int64_t hd = 16 * NV;
  const int64_t S16 = (d.S + 15) / 16 * 16, entry = d.KV * hd;
  float *cache = scratch, *local = scratch + S16, *pre = local + d.n;
  for (int64_t t = blk * d.n; t < (blk + 1) * d.n; ++t)
    for (int64_t h = 0; h < d.H; ++h) {
      const int64_t row = (b * d.T + t) * d.H + h, kv = h / d.groups();
      __m512 qv[NV], acc[NV];
      load<NV>(in.q + row * hd, qv);
      const float top = scores<NV>(d, in, b, t, h, qv, cache, local, pre);
      for (int c = 0; c < NV; ++c) acc[c] = _mm512_setzero_ps();
      float mass = 0.f;
      const __m512 topv = _mm512_set1_ps(top), minus_inf = _mm512_set1_ps(-INFINITY);
      const float* vh = in.values + (b * d.S * d.KV + kv) * hd;
      alignas(64) float e[16];
      for (int64_t j0 = 0; j0 < S16; j0 += 16) {
        const __m512 s = _mm512_loadu_ps(cache + j0);
        const __mmask16 live = _mm512_cmp_ps_mask(s, minus_inf, _CMP_NEQ_OQ);
        if (!live) continue;
        const __m512 ev = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(s, topv)));
        mass += _mm512_reduce_add_ps(ev);
        _mm512_store_ps(e, ev);
        for (int i = 0; i < 16; ++i)
          if (e[i] != 0.f) axpy<NV>(e[i], vh + (j0 + i) * entry, acc);
      }
      const int64_t first = t / d.n * d.n;
      for (int64_t j = 0; j < d.n; ++j)
        if (local[j] != -INFINITY) {
          const float w = std::exp(local[j] - top);
          mass += w;
          axpy<NV>(w, in.local_v + ((b * d.T + first + j) * d.KV + kv) * hd, acc);
        }
      for (int64_t j = 0; j < d.P; ++j)
        if (pre[j] != -INFINITY) {
          const float w = std::exp(pre[j] - top);
          mass += w;
          axpy<NV>(w, in.prefix + ((d.P + j) * d.KV + kv) * hd, acc);
        }
      const __m512 inv = _mm512_set1_ps(1.0f / mass);
      for (int c = 0; c < NV; ++c) _mm512_storeu_ps(out + row * hd + 16 * c, _mm512_mul_ps(acc[c], inv));
      lse[row] = top + std::log(mass);
    }
}

// The gradient of chunk (b, block): dq of its rows, the whole gradient of its block's local
// entries, and its share of the prefix's gradient in d_prefix (its own [2, P, KV, hd] slot).
template <int NV>
void grad_chunk(const Dims& d, const Inputs& in, const float* out, const float* lse, const float* g_out, float* dq,
                float* d_local_k, float* d_local_v, float* d_prefix, int64_t b, int64_t blk, float* scratch) {
  constexpr int64_t hd = 16 * NV;
  const float scale = 1.0f / std::sqrt(float(hd));
  const int64_t S16 = (d.S + 15) / 16 * 16, entry = d.KV * hd;
  float *cache = scratch, *local = scratch + S16, *pre = local + d.n;
  const int64_t first = blk * d.n;
  std::memset(d_local_k + (b * d.T + first) * d.KV * hd, 0, sizeof(float) * d.n * d.KV * hd);
  std::memset(d_local_v + (b * d.T + first) * d.KV * hd, 0, sizeof(float) * d.n * d.KV * hd);
  std::memset(d_prefix, 0, sizeof(float) * 2 * d.P * d.KV * hd);
  for (int64_t t = first; t < first + d.n; ++t)
    for (int64_t h = 0; h < d.H; ++h) {
      const int64_t row = (b * d.T + t) * d.H + h, kv = h / d.groups();
      __m512 qv[NV], gv[NV], ov[NV], dqv[NV];
      load<NV>(in.q + row * hd, qv);
      load<NV>(g_out + row * hd, gv);
      load<NV>(out + row * hd, ov);
      scores<NV>(d, in, b, t, h, qv, cache, local, pre);
      __m512 dsum = _mm512_mul_ps(gv[0], ov[0]);
      for (int c = 1; c < NV; ++c) dsum = _mm512_fmadd_ps(gv[c], ov[c], dsum);
      const float D = _mm512_reduce_add_ps(dsum), m = lse[row];
      for (int c = 0; c < NV; ++c) dqv[c] = _mm512_setzero_ps();
      const __m512 mv = _mm512_set1_ps(m), Dv = _mm512_set1_ps(D), minus_inf = _mm512_set1_ps(-INFINITY);
      const float* kh = in.keys + (b * d.S * d.KV + kv) * hd;
      const float* vh = in.values + (b * d.S * d.KV + kv) * hd;
      alignas(64) float ds[16];
      for (int64_t j0 = 0; j0 < S16; j0 += 16) {
        const __m512 s = _mm512_loadu_ps(cache + j0);
        const __mmask16 live = _mm512_cmp_ps_mask(s, minus_inf, _CMP_NEQ_OQ);
        if (!live) continue;
        const __m512 p = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(s, mv)));
        const __m512 dp = dots16<NV>(gv, vh, entry, j0, d.S);  // g . v_j
        _mm512_store_ps(ds, _mm512_mul_ps(_mm512_mul_ps(p, _mm512_sub_ps(dp, Dv)), _mm512_set1_ps(scale)));
        for (int i = 0; i < 16; ++i)
          if (ds[i] != 0.f) axpy<NV>(ds[i], kh + (j0 + i) * entry, dqv);
      }
      auto own = [&](float score, const float* k, const float* v, float* dk, float* dv) {  // a local or prefix entry
        if (score == -INFINITY) return;
        const float p = std::exp(score - m), g = scale * p * (dot<NV>(gv, v) - D);
        axpy<NV>(g, k, dqv);
        axpy_to<NV>(g, qv, dk);
        axpy_to<NV>(p, gv, dv);
      };
      for (int64_t j = 0; j < d.n; ++j) {
        const int64_t at = ((b * d.T + first + j) * d.KV + kv) * hd;
        own(local[j], in.local_k + at, in.local_v + at, d_local_k + at, d_local_v + at);
      }
      for (int64_t j = 0; j < d.P; ++j) {
        const int64_t at = (j * d.KV + kv) * hd, v_at = ((d.P + j) * d.KV + kv) * hd;
        own(pre[j], in.prefix + at, in.prefix + v_at, d_prefix + at, d_prefix + v_at);
      }
      for (int c = 0; c < NV; ++c) _mm512_storeu_ps(dq + row * hd + 16 * c, dqv[c]);
    }
}

template <int NV, typename F>
void each_chunk(ffi::ThreadPool& pool, const Dims& d, F f) {
  const int64_t blocks = d.T / d.n, S16 = (d.S + 15) / 16 * 16;
  parallel_chunks(pool, d.B * blocks, [&, blocks, S16](int64_t c) {
    std::unique_ptr<float[]> scratch(new float[S16 + d.n + d.P]);
    f(c / blocks, c % blocks, c, scratch.get());
  });
}

// Shapes: q [B, T, H, hd], keys/values [B, S, KV, hd], visible [B, T, S], local k/v [B, T, KV, hd],
// prefix [2, P, KV, hd], prefix_rows [B, T]; T a multiple of n; hd 32, 64 or 128; float32.
Dims dims(const ffi::AnyBuffer& q, const ffi::AnyBuffer& keys, const ffi::AnyBuffer& prefix, int64_t n) {
  const auto qd = q.dimensions(), kd = keys.dimensions(), pd = prefix.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || pd.size() != 4) return Dims{0, 0, 0, 0, 0, 0, 0, 0};  // refused by check
  return Dims{qd[0], qd[1], qd[2], kd[2], kd[1], pd[1], n, qd[3]};
}

bool has_shape(const ffi::AnyBuffer& x, std::initializer_list<int64_t> shape) {
  const auto dims = x.dimensions();
  return dims.size() == shape.size() && std::equal(shape.begin(), shape.end(), dims.begin());
}

ffi::Error check(const Dims& d, const ffi::AnyBuffer& keys, const ffi::AnyBuffer& values, const ffi::AnyBuffer& visible,
                 const ffi::AnyBuffer& lk, const ffi::AnyBuffer& lv, const ffi::AnyBuffer& prefix,
                 const ffi::AnyBuffer& prefix_rows, std::initializer_list<const ffi::AnyBuffer*> floats) {
  for (auto* x : floats)
    if (x->element_type() != ffi::DataType::F32)
      return ffi::Error::InvalidArgument("pass_jax_block_attention: want float32 queries, keys and values");
  if (d.n <= 0 || d.KV <= 0 || d.T % d.n || d.H % d.KV || (d.hd != 32 && d.hd != 64 && d.hd != 128))
    return ffi::Error::InvalidArgument("pass_jax_block_attention: want T a multiple of the block, H of KV, hd 32/64/128");
  if (!has_shape(keys, {d.B, d.S, d.KV, d.hd}) || !has_shape(values, {d.B, d.S, d.KV, d.hd}) ||
      !has_shape(prefix, {2, d.P, d.KV, d.hd}) || !has_shape(visible, {d.B, d.T, d.S}) ||
      !has_shape(lk, {d.B, d.T, d.KV, d.hd}) || !has_shape(lv, {d.B, d.T, d.KV, d.hd}) ||
      !has_shape(prefix_rows, {d.B, d.T}) || visible.element_type() != ffi::DataType::PRED ||
      prefix_rows.element_type() != ffi::DataType::PRED)
    return ffi::Error::InvalidArgument("pass_jax_block_attention: mismatched shapes (see block_attention_cpu.cc)");
  return ffi::Error::Success();
}

template <typename F>
ffi::Error by_head_dim(int64_t hd, F f) {
  using std::integral_constant;
  if (hd == 32) f(integral_constant<int, 2>{});
  else if (hd == 64) f(integral_constant<int, 4>{});
  else f(integral_constant<int, 8>{});
  return ffi::Error::Success();
}

Inputs inputs(ffi::AnyBuffer q, ffi::AnyBuffer keys, ffi::AnyBuffer values, ffi::AnyBuffer visible, ffi::AnyBuffer lk,
              ffi::AnyBuffer lv, ffi::AnyBuffer prefix, ffi::AnyBuffer prefix_rows) {
  return Inputs{q.typed_data<float>(), keys.typed_data<float>(), values.typed_data<float>(), lk.typed_data<float>(),
                lv.typed_data<float>(), prefix.typed_data<float>(), reinterpret_cast<const bool*>(visible.untyped_data()),
                reinterpret_cast<const bool*>(prefix_rows.untyped_data())};
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer keys, ffi::AnyBuffer values,
                   ffi::AnyBuffer visible, ffi::AnyBuffer lk, ffi::AnyBuffer lv, ffi::AnyBuffer prefix,
                   ffi::AnyBuffer prefix_rows, int64_t block, ffi::Result<ffi::AnyBuffer> out,
                   ffi::Result<ffi::AnyBuffer> lse) {
  const Dims d = dims(q, keys, prefix, block);
  if (auto err = check(d, keys, values, visible, lk, lv, prefix, prefix_rows, {&q, &keys, &values, &lk, &lv, &prefix});
      err.failure())
    return err;
  const Inputs in = inputs(q, keys, values, visible, lk, lv, prefix, prefix_rows);
  float *op = out->typed_data<float>(), *lp = lse->typed_data<float>();
  return by_head_dim(d.hd, [&](auto nv) {
    constexpr int NV = decltype(nv)::value;
    each_chunk<NV>(pool, d, [&](int64_t b, int64_t blk, int64_t, float* s) {
      forward_chunk<NV>(d, in, op, lp, b, blk, s);
    });
  });
}

ffi::Error Grad(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer keys, ffi::AnyBuffer values,
                ffi::AnyBuffer visible, ffi::AnyBuffer lk, ffi::AnyBuffer lv, ffi::AnyBuffer prefix,
                ffi::AnyBuffer prefix_rows, ffi::AnyBuffer out, ffi::AnyBuffer lse, ffi::AnyBuffer g_out, int64_t block,
                ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> d_lk, ffi::Result<ffi::AnyBuffer> d_lv,
                ffi::Result<ffi::AnyBuffer> d_prefix) {
  const Dims d = dims(q, keys, prefix, block);
  if (auto err = check(d, keys, values, visible, lk, lv, prefix, prefix_rows,
                       {&q, &keys, &values, &lk, &lv, &prefix, &out, &lse, &g_out});
      err.failure())
    return err;
  if (!has_shape(out, {d.B, d.T, d.H, d.hd}) || !has_shape(g_out, {d.B, d.T, d.H, d.hd}) ||
      !has_shape(lse, {d.B, d.T, d.H}))
    return ffi::Error::InvalidArgument("pass_jax_block_attention_grad: out, lse and g_out must match q");
  const Inputs in = inputs(q, keys, values, visible, lk, lv, prefix, prefix_rows);
  const float *op = out.typed_data<float>(), *lp = lse.typed_data<float>(), *gp = g_out.typed_data<float>();
  float *dqp = dq->typed_data<float>(), *dkp = d_lk->typed_data<float>(), *dvp = d_lv->typed_data<float>();
  float* dpp = d_prefix->typed_data<float>();
  const int64_t slot = 2 * d.P * d.KV * d.hd;
  return by_head_dim(d.hd, [&](auto nv) {
    constexpr int NV = decltype(nv)::value;
    each_chunk<NV>(pool, d, [&](int64_t b, int64_t blk, int64_t c, float* s) {
      grad_chunk<NV>(d, in, op, lp, gp, dqp, dkp, dvp, dpp + c * slot, b, blk, s);
    });
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PassJaxBlockAttention, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int64_t>("block")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PassJaxBlockAttentionGrad, Grad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int64_t>("block")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
