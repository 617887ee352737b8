// Run-time selection of the CPU kernel variant.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#include "chain_kernel.h"

namespace qgoft::cpu {
namespace {

bool cpu_supports(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  switch (isa) {
    case Isa::Generic: return true;
    case Isa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return isa == Isa::Generic;
#endif
}

bool compiled(Isa isa) {
  switch (isa) {
    case Isa::Generic: return true;
#ifdef QGOFT_HAVE_AVX2
    case Isa::Avx2: return true;
#endif
#ifdef QGOFT_HAVE_AVX512
    case Isa::Avx512: return true;
#endif
    default: return false;
  }
}

bool usable(Isa isa) { return compiled(isa) && cpu_supports(isa); }

Isa best_isa() {
  if (const char* env = std::getenv("QGOFT_CPU_ISA")) {
    for (Isa isa : {Isa::Generic, Isa::Avx2, Isa::Avx512}) {
      if (std::strcmp(env, isa_name(isa)) == 0 && usable(isa)) return isa;
    }
  }
  for (Isa isa : {Isa::Avx512, Isa::Avx2}) {
    if (usable(isa)) return isa;
  }
  return Isa::Generic;
}

std::atomic<int>& current() {
  static std::atomic<int> isa{static_cast<int>(best_isa())};
  return isa;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Generic: return "generic";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
  }
  return "unknown";
}

bool isa_compiled(Isa isa) { return compiled(isa); }
bool isa_supported_by_cpu(Isa isa) { return cpu_supports(isa); }
Isa selected_isa() { return static_cast<Isa>(current().load(std::memory_order_relaxed)); }

bool set_isa(Isa isa) {
  if (!usable(isa)) return false;
  current().store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

#define QGOFT_ISA_SWITCH(call)                        \
  switch (selected_isa()) {                           \
    QGOFT_AVX512_CASE(call)                           \
    QGOFT_AVX2_CASE(call)                             \
    default: return generic::call;                    \
  }
#ifdef QGOFT_HAVE_AVX512
#define QGOFT_AVX512_CASE(call) case Isa::Avx512: return avx512::call;
#else
#define QGOFT_AVX512_CASE(call)
#endif
#ifdef QGOFT_HAVE_AVX2
#define QGOFT_AVX2_CASE(call) case Isa::Avx2: return avx2::call;
#else
#define QGOFT_AVX2_CASE(call)
#endif

int tile_rows(DType dtype, int64_t d) { QGOFT_ISA_SWITCH(tile_rows(dtype, d)) }

void chain_forward(const ChainParams& p, const void* x, int64_t x_ld, void* y, int64_t row_begin,
                   int64_t row_end) {
  QGOFT_ISA_SWITCH(chain_forward(p, x, x_ld, y, row_begin, row_end))
}

void chain_backward(const ChainParams& p, const void* grad, int64_t grad_ld, const void* x,
                    int64_t x_ld, void* grad_x, int64_t row_begin, int64_t row_end,
                    void* partial_blocks, void* partial_scale) {
  QGOFT_ISA_SWITCH(chain_backward(p, grad, grad_ld, x, x_ld, grad_x, row_begin, row_end,
                                  partial_blocks, partial_scale))
}

}  // namespace qgoft::cpu
