// out = RoPE(x): the first `rotated` heads of x [N, heads, hd] float32 rotated by positions [N] at
// frequencies inv_freq [hd / 2] (Hugging Face's rotate-half form: x * [c, c] + [-x2, x1] * [s, s]),
// the other heads copied, as an XLA FFI call: a layer's fused q | k | v output in one call.
//
// Why: as XLA ops, RoPE is fused into whatever consumes q and k (the attention rows' transpose,
// the cache write), and XLA compiles those fusions differently for a 1-token and a many-token
// pass: the same token's q came out a bit apart, so a bfloat16 verify pass could round a hidden
// state the other way than a 1-token step and flip a near-tied greedy token. Here each element is
// one fixed sequence of float32 operations whatever N: cos/sin of (float)position * inv_freq,
// then fma(x1, c, -(x2 * s)) and fma(x2, c, x1 * s). Rotating by -position is the transpose, so
// the gradient is this call with positions negated.
#include "common.h"

#include <vector>

namespace {
using namespace pass_jax;

ffi::Error Rope(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::F32> inv_freq,
                ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t rotated) {
  const auto d = x.dimensions();
  if (d.size() != 3 || inv_freq.element_count() * 2 != d[2] || positions.element_count() != d[0])
    return ffi::Error::InvalidArgument("pass_jax_rope: want x [N, heads, hd], positions [N], inv_freq [hd / 2]");
  const int64_t N = d[0], H = d[1], hd = d[2], half = hd / 2;
  if (rotated < 0 || rotated > H) return ffi::Error::InvalidArgument("pass_jax_rope: rotated must be in [0, heads]");
  const float* in = x.typed_data();
  const float* inv = inv_freq.typed_data();
  float* o = out->typed_data();
  std::vector<float> c(half), s(half);
  for (int64_t n = 0; n < N; ++n) {
    const float p = float(positions.typed_data()[n]);
    for (int64_t i = 0; i < half; ++i) {
      const float a = p * inv[i];
      c[i] = std::cos(a);
      s[i] = std::sin(a);
    }
    for (int64_t h = 0; h < rotated; ++h) {
      const float* a = in + (n * H + h) * hd;
      float* r = o + (n * H + h) * hd;
      for (int64_t i = 0; i < half; ++i) {
        r[i] = std::fma(a[i], c[i], -(a[half + i] * s[i]));
        r[half + i] = std::fma(a[half + i], c[i], a[i] * s[i]);
      }
    }
    std::memcpy(o + (n * H + rotated) * hd, in + (n * H + rotated) * hd, (H - rotated) * hd * sizeof(float));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PassJaxRope, Rope,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>().Attr<int64_t>("rotated"));
