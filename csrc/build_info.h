// Build and run-time information of the qgoft ops library (exported for the Python module and for
// C++ programs).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace qgoft {

struct BuildInfo {
  std::string version;                     // qgoft version
  std::string torch_version;               // torch the library was built against
  std::string abi;                         // "stable": PyTorch's stable ABI (docs/BUILD.md)
  std::string torch_abi_floor;             // the oldest torch the library loads under
  std::vector<std::string> cpu_isas_compiled;
  std::string cpu_isa_selected;            // chosen at run time (QGOFT_CPU_ISA overrides)
  std::vector<std::string> cpu_isas_supported;  // by this CPU, among the compiled ones
  std::string compiler;
  int num_threads = 1;                     // torch's intra-op threads (torch::stable::get_num_threads)
  int cpu_tile_rows = 0;                   // rows per tile of the selected CPU kernel, float32, d = 4096
};

BuildInfo build_info();
// Selects the CPU kernel variant by name ("generic", "avx2", "avx512"); false if unavailable.
bool set_cpu_isa(const std::string& name);
// Rows per tile of the selected CPU kernel for activations of this dtype ("float32", "float64",
// "bfloat16", "float16") and width d (small d use taller tiles); throws std::invalid_argument.
int cpu_tile_rows(const std::string& dtype, int64_t d);

}  // namespace qgoft
