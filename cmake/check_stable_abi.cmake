# Post-build check (run with cmake -P): the ops library must reference no C++ symbol of torch (c10::,
# at::, torch:: outside the header-only stable API), only PyTorch's stable C shims (aoti_torch_*,
# torch_*), so that it loads under every torch from the stable-ABI floor on (docs/BUILD.md).
# Arguments: -DLIB=<path> -DNM=<nm or empty>
if(NOT NM OR NOT EXISTS "${NM}")
  message(STATUS "qgoft: nm not found; stable-ABI check of ${LIB} skipped")
  return()
endif()
execute_process(COMMAND "${NM}" -D -C --undefined-only "${LIB}" OUTPUT_VARIABLE out RESULT_VARIABLE rc
                ERROR_QUIET)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "qgoft: nm -D ${LIB} failed")
endif()
string(REGEX MATCHALL "[^\n]*(c10::|at::|torch::|caffe2::)[^\n]*" unstable "${out}")
if(unstable)
  string(REPLACE ";" "\n" unstable "${unstable}")
  message(FATAL_ERROR "qgoft: ${LIB} uses torch's version-specific C++ ABI (it must use the stable C shims "
                      "only):\n${unstable}")
endif()
