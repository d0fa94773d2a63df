// y[M, N] = x[M, K] @ w[K, N] for the few rows of a decode pass, on the CPU, as an XLA FFI call.
//
// Why: XLA's CPU dot streams a 1-row product well below memory speed, switches to a matrix-matrix
// kernel at 2 rows that costs ~2x, and takes a pathological path for a 1-row bfloat16 product.
// Here every tile of w is loaded once per row tile and fed to the 4-12 rows held in registers;
// bfloat16 weights are read 32 columns per 64-byte load and widened in registers, so a pass over a
// few tokens reads the weights once, at their stored width. x and y are float32; w is float32 or
// bfloat16.
//
// Each y[m, n] is one float32 fused multiply-add chain over k in order, whatever M, the tile or
// the thread: a row's result does not depend on which other rows share the pass.
//
// Built by pass_jax/cpu_kernel.py with -O3 -march=native; needs AVX-512 (checked there).
#include <type_traits>
#include <utility>

#include "common.h"

namespace {
using namespace pass_jax;

// Rows of w are read down a 16 NV-column strip; the hardware prefetcher does not follow that
// stride, so each step asks for the row kAhead steps ahead.
constexpr int64_t kAhead = 64;

// Rows [m0, m0 + MT) x columns [n0, n0 + 16 NV): MT x NV accumulators live in registers and each
// piece of w loaded feeds all MT rows.
template <int MT, int NV, typename W>
void tile(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0) {
  v16 acc[MT][NV] = {};
  const float* xr = x + m0 * K;
  const W* wr = w + n0;
  for (int64_t k = 0; k < K; ++k, wr += N) {
    if (k + kAhead < K) {
      const char* p = reinterpret_cast<const char*>(wr + kAhead * N);
      for (int l = 0; l < int(16 * NV * sizeof(W)); l += 64) __builtin_prefetch(p + l, 0, 1);
    }
    v16 wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = load_w(wr + 16 * j);
    for (int m = 0; m < MT; ++m) {
      const float xv = xr[m * K + k];
      for (int j = 0; j < NV; ++j) acc[m][j] += xv * wv[j];
    }
  }
  for (int m = 0; m < MT; ++m) std::memcpy(y + (m0 + m) * N + n0, acc[m], sizeof(acc[m]));
}

// bfloat16 weights, 32 columns per 64-byte load split into even and odd columns (load_pairs): the
// products run ~1.45x faster at 4-16 rows than widening 16 columns at a time. Even and odd columns
// accumulate apart and are interleaved once, on store.
template <int MT, int NP>
void tile_pairs(const float* x, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0) {
  v16 even[MT][NP] = {}, odd[MT][NP] = {};
  const float* xr = x + m0 * K;
  const uint16_t* wr = w + n0;
  for (int64_t k = 0; k < K; ++k, wr += N) {
    if (k + kAhead < K) {
      const char* p = reinterpret_cast<const char*>(wr + kAhead * N);
      for (int l = 0; l < 64 * NP; l += 64) __builtin_prefetch(p + l, 0, 1);
    }
    __m512 we[NP], wo[NP];
    for (int j = 0; j < NP; ++j) load_pairs(wr + 32 * j, we[j], wo[j]);
    for (int m = 0; m < MT; ++m) {
      const float xv = xr[m * K + k];
      for (int j = 0; j < NP; ++j) {
        even[m][j] += xv * v16(we[j]);
        odd[m][j] += xv * v16(wo[j]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NP; ++j)
      store_interleaved(y + (m0 + m) * N + n0 + 32 * j, __m512(even[m][j]), __m512(odd[m][j]));
}

// A tile function for MT rows of width NV panels of 16 columns, for float32 or bfloat16 weights.
template <int MT, int NV, typename W>
void any_tile(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0) {
  if constexpr (std::is_same_v<W, uint16_t> && NV % 2 == 0) tile_pairs<MT, NV / 2>(x, w, y, K, N, m0, n0);
  else tile<MT, NV>(x, w, y, K, N, m0, n0);
}

// All M rows against columns [n0, n0 + 16 NV): full tiles of MT rows, then one smaller tile.
template <int MT, int NV, typename W>
void strip(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0) {
  int64_t m = 0;
  for (; m + MT <= M; m += MT) any_tile<MT, NV>(x, w, y, K, N, m, n0);
  const int64_t left = M - m;
  [&]<int... I>(std::integer_sequence<int, I...>) {
    ((left == I + 1 ? (any_tile<I + 1, NV>(x, w, y, K, N, m, n0), 0) : 0), ...);
  }(std::make_integer_sequence<int, MT - 1>{});
}

// Calls f(MT, NV) with the register tile for M rows: MT rows x NV panels of 16 columns, whose
// accumulators fill the 32 registers. Past one tile of rows, later row tiles read w from the cache.
template <typename W, typename F>
void with_tile(int64_t M, F f) {
  using std::integral_constant;
  if constexpr (std::is_same_v<W, uint16_t>) {  // 2 x MT x NV / 2 accumulators
    if (M <= 4) f(integral_constant<int, 4>{}, integral_constant<int, 6>{});
    else f(integral_constant<int, 7>{}, integral_constant<int, 4>{});
  } else {
    if (M <= 6) f(integral_constant<int, 6>{}, integral_constant<int, 4>{});
    else if (M <= 8) f(integral_constant<int, 8>{}, integral_constant<int, 3>{});
    else if (M <= 12) f(integral_constant<int, 12>{}, integral_constant<int, 2>{});
    else f(integral_constant<int, 8>{}, integral_constant<int, 3>{});
  }
}

// Columns [n0, n1), a multiple of 16: M's register tile, then narrower strips for what is left.
template <typename W>
void columns(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  auto sweep = [&](auto mt, auto nv) {
    constexpr int MT = decltype(mt)::value, NV = decltype(nv)::value;
    for (; n0 + 16 * NV <= n1; n0 += 16 * NV) strip<MT, NV>(x, w, y, M, K, N, n0);
  };
  with_tile<W>(M, sweep);
  if constexpr (std::is_same_v<W, uint16_t>) sweep(std::integral_constant<int, 14>{}, std::integral_constant<int, 2>{});
  sweep(std::integral_constant<int, 8>{}, std::integral_constant<int, 1>{});
}

template <typename W>
void tail_columns(const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < N; ++n) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc = __builtin_fmaf(x[m * K + k], to_float(w[k * N + n]), acc);
      y[m * N + n] = acc;
    }
}

template <typename W>
void run(ffi::ThreadPool& pool, const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N) {
  const int64_t panels = N / 16;
  int64_t width = 1;
  with_tile<W>(M, [&](auto, auto nv) { width = decltype(nv)::value; });
  // 12 panels a chunk (a multiple of every tile width), unless that leaves too few chunks for the
  // threads to finish together: SmolLM2's 576-column products would be 3 chunks on 2 threads.
  const int64_t per_chunk = panels >= 8 * 12 ? 12 : width;
  parallel_chunks(pool, (panels + per_chunk - 1) / per_chunk, [=](int64_t c) {
    columns(x, w, y, M, K, N, c * per_chunk * 16, std::min(panels, (c + 1) * per_chunk) * 16);
  });
  if (N % 16) tail_columns(x, w, y, M, K, N, panels * 16);
}

// --- y[M, N] = x[M, K] @ w[N, K]^T: the tied output head, whose weight is the [vocab, D] embedding.
// Rows of w are contiguous along k, so accumulators hold k-lanes of one (m, n) pair and are summed
// across lanes at the end; an NT-row block of w stays in L1 while every row tile of x passes over
// it. A step covers 16 k of float32 w, or 32 k of bfloat16 w split into even and odd k as above
// (x is reordered to match once per call: per 32 k, the 16 even then the 16 odd).

template <typename W>
constexpr int64_t kStep = std::is_same_v<W, uint16_t> ? 32 : 16;

inline float lane_sum(v16 v) { return _mm512_reduce_add_ps(__m512(v)); }

template <int MT, int NT, typename W>
void tile_t(const float* x, const float* xs, const W* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t n0) {
  constexpr int64_t S = kStep<W>;
  constexpr int64_t kAheadRows = 2 * NT;  // each row of w is one short stream: fetch the block after next
  v16 acc[MT][NT] = {};
  const int64_t ks = K / S * S;
  for (int64_t k = 0; k < ks; k += S) {
    for (int j = 0; j < NT; ++j)
      if (n0 + j + kAheadRows < N) __builtin_prefetch(w + (n0 + j + kAheadRows) * K + k, 0, 1);
    if constexpr (std::is_same_v<W, uint16_t>) {
      __m512 we[NT], wo[NT];
      for (int j = 0; j < NT; ++j) load_pairs(w + (n0 + j) * K + k, we[j], wo[j]);
      for (int m = 0; m < MT; ++m) {
        const v16 xe = load_w(xs + (m0 + m) * K + k), xo = load_w(xs + (m0 + m) * K + k + 16);
        for (int j = 0; j < NT; ++j) acc[m][j] = acc[m][j] + xe * v16(we[j]) + xo * v16(wo[j]);
      }
    } else {
      v16 wv[NT];
      for (int j = 0; j < NT; ++j) wv[j] = load_w(w + (n0 + j) * K + k);
      for (int m = 0; m < MT; ++m) {
        const v16 xv = load_w(xs + (m0 + m) * K + k);
        for (int j = 0; j < NT; ++j) acc[m][j] += xv * wv[j];
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NT; ++j) {
      float s = lane_sum(acc[m][j]);
      for (int64_t k = ks; k < K; ++k) s = __builtin_fmaf(x[(m0 + m) * K + k], to_float(w[(n0 + j) * K + k]), s);
      y[(m0 + m) * N + n0 + j] = s;
    }
}

template <int NT, typename W>
void rows_t(const float* x, const float* xs, const W* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0) {
  constexpr int MT = 4;
  int64_t m = 0;
  for (; m + MT <= M; m += MT) tile_t<MT, NT>(x, xs, w, y, K, N, m, n0);
  switch (M - m) {
    case 3: tile_t<3, NT>(x, xs, w, y, K, N, m, n0); break;
    case 2: tile_t<2, NT>(x, xs, w, y, K, N, m, n0); break;
    case 1: tile_t<1, NT>(x, xs, w, y, K, N, m, n0); break;
  }
}

template <typename W>
void run_t(ffi::ThreadPool& pool, const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N) {
  const float* xs = x;
  std::unique_ptr<float[]> reordered;
  if constexpr (std::is_same_v<W, uint16_t>) {  // per 32 k: the even k, then the odd k
    reordered.reset(new float[M * K]);
    std::memcpy(reordered.get(), x, sizeof(float) * M * K);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k + 32 <= K; k += 32)
        for (int i = 0; i < 16; ++i) {
          reordered[m * K + k + i] = x[m * K + k + 2 * i];
          reordered[m * K + k + 16 + i] = x[m * K + k + 2 * i + 1];
        }
    xs = reordered.get();
  }
  constexpr int NT = 6;
  constexpr int64_t kRowsPerChunk = 16 * NT;
  parallel_chunks(pool, (N + kRowsPerChunk - 1) / kRowsPerChunk, [=](int64_t c) {
    const int64_t end = std::min(N, (c + 1) * kRowsPerChunk);
    int64_t n = c * kRowsPerChunk;
    for (; n + NT <= end; n += NT) rows_t<NT>(x, xs, w, y, M, K, N, n);
    for (; n < end; ++n) rows_t<1>(x, xs, w, y, M, K, N, n);
  });
}

// transposed: w is [N, K] (the tied head) rather than [K, N].
template <bool transposed>
ffi::Error Dense(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  const int64_t wk = wd.size() == 2 ? wd[transposed ? 1 : 0] : -1;
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wk || x.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("pass_jax_dense: want float32 x [M, K] and w [K, N] (or [N, K])");
  const int64_t M = xd[0], K = xd[1], N = wd[transposed ? 0 : 1];
  const float* xp = x.typed_data<float>();
  float* yp = y->typed_data<float>();
  if (w.element_type() == ffi::DataType::F32) {
    const float* wp = w.typed_data<float>();
    transposed ? run_t(pool, xp, wp, yp, M, K, N) : run(pool, xp, wp, yp, M, K, N);
  } else if (w.element_type() == ffi::DataType::BF16) {
    const auto* wp = reinterpret_cast<const uint16_t*>(w.untyped_data());
    transposed ? run_t(pool, xp, wp, yp, M, K, N) : run(pool, xp, wp, yp, M, K, N);
  } else {
    return ffi::Error::InvalidArgument("pass_jax_dense: weights must be float32 or bfloat16");
  }
  return ffi::Error::Success();
}

}  // namespace

#define PASS_JAX_BINDING \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
XLA_FFI_DEFINE_HANDLER_SYMBOL(PassJaxDense, Dense<false>, PASS_JAX_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(PassJaxDenseT, Dense<true>, PASS_JAX_BINDING);
