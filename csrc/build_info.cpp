#include "build_info.h"

#include <ATen/Parallel.h>

#include <initializer_list>

#include "cpu/chain_kernel.h"

#ifndef QGOFT_VERSION
#define QGOFT_VERSION "unknown"
#endif
#ifndef QGOFT_TORCH_VERSION
#define QGOFT_TORCH_VERSION "unknown"
#endif

namespace qgoft {

BuildInfo build_info() {
  BuildInfo info;
  info.version = QGOFT_VERSION;
  info.torch_version = QGOFT_TORCH_VERSION;
  for (cpu::Isa isa : {cpu::Isa::Generic, cpu::Isa::Avx2, cpu::Isa::Avx512}) {
    if (!cpu::isa_compiled(isa)) continue;
    info.cpu_isas_compiled.emplace_back(cpu::isa_name(isa));
    if (cpu::isa_supported_by_cpu(isa)) info.cpu_isas_supported.emplace_back(cpu::isa_name(isa));
  }
  info.cpu_isa_selected = cpu::isa_name(cpu::selected_isa());
#ifdef QGOFT_WITH_CUDA
  info.cuda_compiled = true;
#endif
#if defined(__clang__)
  info.compiler = "clang " __clang_version__;
#elif defined(__GNUC__)
  info.compiler = "gcc " __VERSION__;
#endif
  info.num_threads = at::get_num_threads();
  info.cpu_tile_rows = cpu::tile_rows();
  return info;
}

bool set_cpu_isa(const std::string& name) {
  for (cpu::Isa isa : {cpu::Isa::Generic, cpu::Isa::Avx2, cpu::Isa::Avx512}) {
    if (name == cpu::isa_name(isa)) return cpu::set_isa(isa);
  }
  return false;
}

}  // namespace qgoft
