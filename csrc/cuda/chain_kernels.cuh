// All device code of the CUDA Givens chain (the host emulation in sim/ includes this one header):
//   chain_device.cuh    element types, chunk I/O, block loads, the 2 x 2 pair updates
//   chain_parallel.cuh  the parallel layout's register / shuffle kernels
//   chain_stack.cuh     stack(parallel(d), k): the parallel machinery k times over the registers
//   chain_stack_reg.cuh its reg backward (one barrier per repetition and direction, register accumulators)
//   chain_parallel_reg.cuh  the parallel backward's reg variant
//   chain_parallel_pair.cuh the reg backward with two rows per thread in flight (QGOFT_CUDA_BACKWARD=pair)
//   chain_parallel_prefetch.cuh  the parallel table forward, software-pipelined (QGOFT_CUDA_FORWARD=prefetch)
//   chain_butterfly.cuh layouts.butterfly(d)'s forward and backward: rows per thread, rounds of 3 bits, smem transposes
//   chain_general.cuh   any layout, rows in shared or global memory
//   chain_params.cuh    blocks from angles, the deterministic reduction of partial rows
// The launchers (chain_launch.cuh) instantiate them per activation dtype. Design: docs/CUDA.md.
#pragma once

#include "chain_butterfly.cuh"
#include "chain_device.cuh"
#include "chain_general.cuh"
#include "chain_parallel.cuh"
#include "chain_parallel_pair.cuh"
#include "chain_parallel_prefetch.cuh"
#include "chain_parallel_reg.cuh"
#include "chain_params.cuh"
#include "chain_stack.cuh"
#include "chain_stack_reg.cuh"
