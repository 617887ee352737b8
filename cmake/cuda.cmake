# The CUDA kernels (csrc/cuda) and their ATen glue as libqgoft_cuda.so; included by CMakeLists.txt when
# QGOFT_WITH_CUDA. The glue uses ATen API the stable ABI lacks (docs/BUILD.md), so this library is tied to
# the torch release it is built against; find_package(Torch) provides the CUDA setup and libraries.

# A CUDA build of torch enables the CUDA language inside find_package(Torch) and takes its GPU
# architectures from TORCH_CUDA_ARCH_LIST (CMake variable or environment). Default: Ampere (sm_80) and
# Hopper (sm_90) machine code, plus sm_90 PTX for newer GPUs.
if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
  set(TORCH_CUDA_ARCH_LIST "8.0;9.0+PTX")
endif()
# nvcc and the toolkit root for torch's CUDA detection (a wrapper script on PATH, e.g. /usr/local/bin/nvcc,
# would make torch's FindCUDA look for the toolkit next to the wrapper).
if(NOT DEFINED CMAKE_CUDA_COMPILER AND "$ENV{CUDACXX}" STREQUAL "")
  find_program(QGOFT_NVCC nvcc NO_DEFAULT_PATH
               PATHS "$ENV{CUDA_HOME}/bin" "$ENV{CUDA_PATH}/bin" /usr/local/cuda/bin)
  if(NOT QGOFT_NVCC)
    find_program(QGOFT_NVCC nvcc)
  endif()
  if(QGOFT_NVCC)
    set(CMAKE_CUDA_COMPILER "${QGOFT_NVCC}")
  endif()
endif()
if(CMAKE_CUDA_COMPILER AND NOT DEFINED CUDA_TOOLKIT_ROOT_DIR)
  get_filename_component(QGOFT_NVCC_REAL "${CMAKE_CUDA_COMPILER}" REALPATH)
  get_filename_component(QGOFT_CUDA_ROOT "${QGOFT_NVCC_REAL}" DIRECTORY)
  get_filename_component(QGOFT_CUDA_ROOT "${QGOFT_CUDA_ROOT}" DIRECTORY)
  if(EXISTS "${QGOFT_CUDA_ROOT}/include/cuda_runtime.h")
    set(CUDA_TOOLKIT_ROOT_DIR "${QGOFT_CUDA_ROOT}")
  endif()
endif()
if(NOT Torch_DIR)
  set(Torch_DIR "${QGOFT_TORCH_DIR}/share/cmake/Torch")
endif()
find_package(Torch REQUIRED)
if(CMAKE_CXX_STANDARD GREATER_EQUAL 20 AND CMAKE_VERSION VERSION_LESS 3.26)
  message(FATAL_ERROR "qgoft: the CUDA kernels with torch ${Torch_VERSION} (C++20) need CMake >= 3.26, "
                      "this is ${CMAKE_VERSION}; `pip install cmake` (or build with QGOFT_CUDA=0)")
endif()
enable_language(CUDA)  # already enabled by torch's CMake config; harmless
set(CMAKE_CUDA_STANDARD ${CMAKE_CXX_STANDARD})
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
# The toolkit must have torch's CUDA major version (libcudart.so.<major> is what torch loads).
string(REGEX MATCH "^[0-9]+" qgoft_nvcc_major "${CMAKE_CUDA_COMPILER_VERSION}")
string(REGEX MATCH "^[0-9]+" qgoft_torch_cuda_major "${QGOFT_TORCH_CUDA_VERSION}")
if(NOT qgoft_nvcc_major STREQUAL qgoft_torch_cuda_major)
  message(FATAL_ERROR "qgoft: nvcc ${CMAKE_CUDA_COMPILER_VERSION} (${CMAKE_CUDA_COMPILER}) but torch "
                      "${QGOFT_TORCH_VERSION} was built with CUDA ${QGOFT_TORCH_CUDA_VERSION}; point "
                      "CUDA_HOME at a CUDA ${qgoft_torch_cuda_major} toolkit, or build the CPU kernels only: "
                      "QGOFT_CUDA=0 pip install .")
endif()
file(GLOB QGOFT_CUDA_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu
     ${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cpp)
# No implicit half/bfloat16 conversions or operators in our kernels (intrinsics only); line info for
# compute-sanitizer; never fast math (sincosf and rounding must be the accurate ones).
set(QGOFT_CUDA_FLAGS -lineinfo -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
option(QGOFT_CUDA_PTXAS_VERBOSE "Print register / shared memory / spill use of every CUDA kernel" OFF)
if(QGOFT_CUDA_PTXAS_VERBOSE)
  list(APPEND QGOFT_CUDA_FLAGS -Xptxas=-v)
endif()
message(STATUS "qgoft: CUDA ${CMAKE_CUDA_COMPILER_VERSION} at ${CMAKE_CUDA_COMPILER}, "
               "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}$ENV{TORCH_CUDA_ARCH_LIST}, "
               "CUDA flags: ${CMAKE_CUDA_FLAGS}")
# torch's list of libraries, without the entries this toolkit lacks and the kernels do not need (torch
# lists nvrtc, absent from minimal toolkits).
set(QGOFT_TORCH_LINK_LIBRARIES ${TORCH_LIBRARIES})
list(FILTER QGOFT_TORCH_LINK_LIBRARIES EXCLUDE REGEX "-NOTFOUND$")

add_library(qgoft_cuda SHARED ${QGOFT_CUDA_SOURCES})
target_link_libraries(qgoft_cuda PRIVATE qgoft_ops ${QGOFT_TORCH_LINK_LIBRARIES})
target_compile_options(qgoft_cuda PRIVATE "$<$<COMPILE_LANGUAGE:CUDA>:${QGOFT_CUDA_FLAGS}>"
                       $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter>)
# One CUDA runtime in the process: the shared libcudart that torch loads.
set_target_properties(qgoft_cuda PROPERTIES CUDA_RUNTIME_LIBRARY Shared
  BUILD_RPATH "\$ORIGIN;${QGOFT_TORCH_LIB_DIR}"
  INSTALL_RPATH "\$ORIGIN;${QGOFT_TORCH_LIB_DIR}")
qgoft_use_shared_libstdcxx(qgoft_cuda)
