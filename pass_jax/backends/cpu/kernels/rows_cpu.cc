// out[n, :] = float32(table[tokens[n], :]): the embedding rows of a pass, as an XLA FFI call.
//
// Why: XLA's CPU backend gathers bfloat16 in float32. It widens the whole table first, and since
// the table is a constant of the decode loop it hoists that out of the loop: a 113 MB float32
// copy of SmolLM2's bfloat16 table made on every call (45 ms). Here only the rows asked for are
// read. A negative token counts from the end and an out-of-range one is clamped, as XLA's gather.
#include "common.h"

namespace {
using namespace pass_jax;

template <typename W>
void copy_rows(const W* table, const int32_t* tokens, float* out, int64_t V, int64_t D, int64_t N) {
  for (int64_t n = 0; n < N; ++n) {
    const int64_t t = std::clamp<int64_t>(tokens[n] < 0 ? tokens[n] + V : tokens[n], 0, V - 1);
    for (int64_t d = 0; d < D; ++d) out[n * D + d] = to_float(table[t * D + d]);
  }
}

ffi::Error Rows(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> tokens, ffi::Result<ffi::Buffer<ffi::F32>> out) {
  const auto td = table.dimensions();
  if (td.size() != 2) return ffi::Error::InvalidArgument("pass_jax_rows: want a table [V, D]");
  const int64_t V = td[0], D = td[1], N = tokens.element_count();
  if (table.element_type() == ffi::DataType::F32)
    copy_rows(table.typed_data<float>(), tokens.typed_data(), out->typed_data(), V, D, N);
  else if (table.element_type() == ffi::DataType::BF16)
    copy_rows(reinterpret_cast<const uint16_t*>(table.untyped_data()), tokens.typed_data(), out->typed_data(), V, D, N);
  else
    return ffi::Error::InvalidArgument("pass_jax_rows: the table must be float32 or bfloat16");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PassJaxRows, Rows,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::S32>>().Ret<ffi::Buffer<ffi::F32>>());
