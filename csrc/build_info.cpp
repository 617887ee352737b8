#include "build_info.h"

#include <torch/csrc/stable/ops.h>

#include <initializer_list>
#include <stdexcept>

#include "cpu/chain_kernel.h"

#ifndef QGOFT_VERSION
#define QGOFT_VERSION "unknown"
#endif
#ifndef QGOFT_TORCH_VERSION
#define QGOFT_TORCH_VERSION "unknown"
#endif
#ifndef QGOFT_TORCH_ABI_FLOOR
#define QGOFT_TORCH_ABI_FLOOR "unknown"
#endif

namespace qgoft {

BuildInfo build_info() {
  BuildInfo info;
  info.version = QGOFT_VERSION;
  info.torch_version = QGOFT_TORCH_VERSION;
  info.abi = "stable";
  info.torch_abi_floor = QGOFT_TORCH_ABI_FLOOR;
  for (cpu::Isa isa : {cpu::Isa::Generic, cpu::Isa::Avx2, cpu::Isa::Avx512}) {
    if (!cpu::isa_compiled(isa)) continue;
    info.cpu_isas_compiled.emplace_back(cpu::isa_name(isa));
    if (cpu::isa_supported_by_cpu(isa)) info.cpu_isas_supported.emplace_back(cpu::isa_name(isa));
  }
  info.cpu_isa_selected = cpu::isa_name(cpu::selected_isa());
#if defined(__clang__)
  info.compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  info.compiler = "gcc " __VERSION__;
#endif
  info.num_threads = static_cast<int>(torch::stable::get_num_threads());
  info.cpu_tile_rows = cpu::tile_rows(cpu::DType::Float32, 4096);
  return info;
}

int cpu_tile_rows(const std::string& dtype, int64_t d) {
  const std::pair<const char*, cpu::DType> names[] = {{"float32", cpu::DType::Float32},
                                                      {"float64", cpu::DType::Float64},
                                                      {"bfloat16", cpu::DType::BFloat16},
                                                      {"float16", cpu::DType::Float16}};
  for (const auto& [name, value] : names) {
    if (dtype == name) return cpu::tile_rows(value, d);
  }
  throw std::invalid_argument("cpu_tile_rows: dtype must be float32, float64, bfloat16 or float16, got " +
                              dtype);
}

bool set_cpu_isa(const std::string& name) {
  for (cpu::Isa isa : {cpu::Isa::Generic, cpu::Isa::Avx2, cpu::Isa::Avx512}) {
    if (name == cpu::isa_name(isa)) return cpu::set_isa(isa);
  }
  return false;
}

}  // namespace qgoft
