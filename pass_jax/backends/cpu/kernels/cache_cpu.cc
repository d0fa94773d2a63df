// Writes into a bfloat16 KV cache buffer [B, S, KV, hd] in place, as XLA FFI calls.
//
// Why: XLA's CPU backend updates a bfloat16 buffer in float32: each dynamic-update-slice widens the
// whole buffer, writes the block and narrows it back, so every layer of every pass cost time in
// proportion to the cache's length (bfloat16 decoding of SmolLM2: 13.1 ms a token with a buffer of
// 128, 21.0 ms with 2048; float32 22.0 -> 22.7 ms). Here a write touches only the entries it
// writes; the buffer is the call's output (aliased), so nothing else is copied.
//
// write: buf[b, o : o + T] = bfloat16(block[b]) with o = clamp(offsets[b], 0, S - T), a negative
//   offset counted from the end first, as jax's dynamic_update_slice takes its start; float32 ->
//   bfloat16 rounds to nearest even, as XLA's convert does.
// move: buf[b, o + d] = buf[b, lengths[b] + path[b, d]] for every d (all read before any write),
//   o = clamp(lengths[b], 0, S - P): KVCache.gather_path. A slot past the buffer reads as NaN, as
//   jnp.take_along_axis fills it.
#include "common.h"

namespace {

inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays a quiet NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

bool is_cache(const ffi::AnyBuffer& buf) {
  return buf.element_type() == ffi::DataType::BF16 && buf.dimensions().size() == 4;
}

ffi::Error Write(ffi::AnyBuffer buf, ffi::Buffer<ffi::F32> block, ffi::Buffer<ffi::S32> offsets,
                 ffi::Result<ffi::AnyBuffer> out) {
  const auto bd = buf.dimensions(), kd = block.dimensions();
  if (!is_cache(buf) || kd.size() != 4 || kd[0] != bd[0] || kd[1] > bd[1] || kd[2] * kd[3] != bd[2] * bd[3] ||
      offsets.element_count() != bd[0])
    return ffi::Error::InvalidArgument("pass_jax_cache_write: want bfloat16 buf [B, S, KV, hd], block [B, T, KV, hd], offsets [B]");
  const int64_t B = bd[0], S = bd[1], T = kd[1], E = bd[2] * bd[3];
  auto* o = reinterpret_cast<uint16_t*>(out->untyped_data());
  const float* x = block.typed_data();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t offset = offsets.typed_data()[b];
    const int64_t start = std::clamp<int64_t>(offset < 0 ? offset + S : offset, 0, S - T);
    uint16_t* dst = o + (b * S + start) * E;
    const float* src = x + b * T * E;
    for (int64_t i = 0; i < T * E; ++i) dst[i] = to_bf16(src[i]);
  }
  return ffi::Error::Success();
}

ffi::Error Move(ffi::AnyBuffer buf, ffi::Buffer<ffi::S32> lengths, ffi::Buffer<ffi::S32> path,
                ffi::Result<ffi::AnyBuffer> out) {
  const auto bd = buf.dimensions(), pd = path.dimensions();
  if (!is_cache(buf) || pd.size() != 2 || pd[0] != bd[0] || pd[1] > bd[1] || lengths.element_count() != bd[0])
    return ffi::Error::InvalidArgument("pass_jax_cache_move: want bfloat16 buf [B, S, KV, hd], lengths [B], path [B, P]");
  const int64_t B = bd[0], S = bd[1], P = pd[1], E = bd[2] * bd[3];
  auto* o = reinterpret_cast<uint16_t*>(out->untyped_data());
  std::unique_ptr<uint16_t[]> moved(new uint16_t[P * E]);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t length = lengths.typed_data()[b];
    for (int64_t d = 0; d < P; ++d) {
      const int64_t slot = length + path.typed_data()[b * P + d];
      if (slot >= 0 && slot < S) std::memcpy(&moved[d * E], o + (b * S + slot) * E, sizeof(uint16_t) * E);
      else std::fill_n(&moved[d * E], E, uint16_t(0x7fc0));
    }
    const int64_t start = std::clamp<int64_t>(length, 0, S - P);
    std::memcpy(o + (b * S + start) * E, moved.get(), sizeof(uint16_t) * P * E);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PassJaxCacheWrite, Write,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PassJaxCacheMove, Move,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>());
