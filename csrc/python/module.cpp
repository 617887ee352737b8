// qgoft._C: build information of the compiled library. The ops themselves live in libqgoft_ops.so
// (loaded by qgoft/_extension.py), which this module links; it uses no torch API (pybind11 only).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "build_info.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "qgoft compiled-library information";
  m.def("build_info", [] {
    const qgoft::BuildInfo info = qgoft::build_info();
    py::dict d;
    d["version"] = info.version;
    d["torch_version_built"] = info.torch_version;
    d["abi"] = info.abi;
    d["torch_abi_floor"] = info.torch_abi_floor;
    d["cpu_isas_compiled"] = info.cpu_isas_compiled;
    d["cpu_isas_supported"] = info.cpu_isas_supported;
    d["cpu_isa_selected"] = info.cpu_isa_selected;
    d["cpu_tile_rows"] = info.cpu_tile_rows;
    d["compiler"] = info.compiler;
    d["num_threads"] = info.num_threads;
    return d;
  }, "Build and run-time information (dict).");
  m.def("cpu_tile_rows", &qgoft::cpu_tile_rows, py::arg("dtype"), py::arg("d"),
        "Rows per tile of the selected CPU kernel for this dtype name and row width d.");
  m.def("set_cpu_isa", &qgoft::set_cpu_isa, py::arg("name"),
        "Select the CPU kernel variant ('generic', 'avx2', 'avx512'); False if unavailable.");
}
