# Post-build check (run with cmake -P): the built library must load the SHARED libstdc++ (NEEDED
# libstdc++.so.6). A copy of libstdc++.a linked into it is a second C++ runtime in the process whose
# locale / facet state is never initialised: formatting an integer into an error message (TORCH_CHECK)
# then calls a wrong facet's virtual and crashes (seen with a GCC whose driver linked libstdc++.a).
# Arguments: -DLIB=<path> -DOBJDUMP=<objdump or empty>
if(NOT OBJDUMP OR NOT EXISTS "${OBJDUMP}")
  message(STATUS "qgoft: objdump not found; shared-libstdc++ check of ${LIB} skipped")
  return()
endif()
execute_process(COMMAND "${OBJDUMP}" -p "${LIB}" OUTPUT_VARIABLE out RESULT_VARIABLE rc ERROR_QUIET)
if(NOT rc EQUAL 0)
  message(STATUS "qgoft: objdump -p ${LIB} failed; shared-libstdc++ check skipped")
  return()
endif()
if(NOT out MATCHES "NEEDED +libstdc\\+\\+\\.so")
  message(FATAL_ERROR "qgoft: ${LIB} does not load the shared libstdc++ (no NEEDED libstdc++.so.6): "
                      "libstdc++ was linked statically, which crashes on the first exception message "
                      "with a number in it. Use a compiler whose libstdc++.so is found at link time, or "
                      "set -DQGOFT_LIBSTDCXX=/path/to/libstdc++.so.6.")
endif()
