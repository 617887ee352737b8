// Definitions of the per-dtype launchers declared in chain_launch.h, included only by chain_<dtype>.cu
// (each explicitly instantiates Launchers<its dtype>, so the build compiles the dtypes in parallel).
// Dynamic shared memory above 48 KiB is enabled per kernel as needed; the caller checks the launch.
#pragma once

#include "chain_kernels.cuh"
#include "chain_launch.h"

namespace qgoft::cuda::detail {

constexpr size_t kDefaultSmemLimit = 48 * 1024;

template <class K>
inline void enable_smem(K* kernel, size_t smem) {
  if (smem > kDefaultSmemLimit) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  }
}

template <class K>
inline int occupancy(K* kernel, int threads, size_t smem) {
  enable_smem(kernel, smem);
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem) != cudaSuccess) {
    (void)cudaGetLastError();  // the launch itself reports a real problem
    blocks = 1;
  }
  return blocks < 1 ? 1 : blocks;
}

template <class K, class Args>
inline void launch(K* kernel, const LaunchConfig& c, cudaStream_t stream, const Args& a) {
  enable_smem(kernel, c.smem);
  kernel<<<c.grid, c.threads, c.smem, stream>>>(a);
}

// The kernel instantiation for the run-time switches (vec: 16-byte row accesses; grads: parameter
// gradients wanted; table: the shared-memory block table variant, ParallelArgs::table > 0; reg: its
// backward with register accumulators, ParallelArgs::reg; prefetch: its prefetching forward,
// ParallelArgs::prefetch).
template <class S>
struct Kernels {
  // rep_loop: forward_rep_loop (the table variant always has it)
  template <bool kVec>
  static auto parallel_forward(bool table, bool rep_loop) {
    if (table) return parallel_forward_kernel<S, kVec, true, true>;
    return rep_loop ? parallel_forward_kernel<S, kVec, false, true> : parallel_forward_kernel<S, kVec, false, false>;
  }
  static auto parallel_forward(bool vec, bool table, bool rep_loop) {
    return vec ? parallel_forward<true>(table, rep_loop) : parallel_forward<false>(table, rep_loop);
  }
  // the prefetching forward (ParallelArgs::prefetch): its instantiation for T = 2^kRegLogT, or for any shape
  static auto parallel_forward_prefetch(bool fixed_width, bool stack) {
    if (stack) {
      return fixed_width ? parallel_forward_prefetch_kernel<S, kRegLogT, true>
                         : parallel_forward_prefetch_kernel<S, 0, true>;
    }
    return fixed_width ? parallel_forward_prefetch_kernel<S, kRegLogT> : parallel_forward_prefetch_kernel<S, 0>;
  }
  template <bool kVec, bool kGrads>
  static auto parallel_backward(bool table) {
    return table ? parallel_backward_kernel<S, kVec, kGrads, true> : parallel_backward_kernel<S, kVec, kGrads, false>;
  }
  // reg: 0 = base / table, 1 = the reg kernel, 2 = its instantiation for T = 2^kRegLogT
  template <bool kVec, bool kGrads>
  static auto parallel_backward(bool table, int reg) {
    if (reg == 2) return parallel_backward_reg_kernel<S, kVec, kGrads, kRegLogT>;
    return reg ? parallel_backward_reg_kernel<S, kVec, kGrads, 0> : parallel_backward<kVec, kGrads>(table);
  }
  static auto parallel_backward(bool vec, bool grads, bool table, int reg = 0) {
    if (vec) return grads ? parallel_backward<true, true>(table, reg) : parallel_backward<true, false>(table, reg);
    return grads ? parallel_backward<false, true>(table, reg) : parallel_backward<false, false>(table, reg);
  }
  template <bool kVec, bool kGrads>
  static auto parallel_stack_backward(bool table) {
    return table ? parallel_stack_backward_kernel<S, kVec, kGrads, true>
                 : parallel_stack_backward_kernel<S, kVec, kGrads, false>;
  }
  static auto parallel_stack_backward(bool vec, bool grads, bool table) {
    if (vec) return grads ? parallel_stack_backward<true, true>(table) : parallel_stack_backward<true, false>(table);
    return grads ? parallel_stack_backward<false, true>(table) : parallel_stack_backward<false, false>(table);
  }
  // the butterfly forward: its instantiation for d = 2^kButterflyMaxLogD (butterfly_fixed_width), or for any d
  template <bool kVec>
  static auto butterfly_forward(bool fixed_width) {
    return fixed_width ? butterfly_forward_kernel<S, kVec, kButterflyMaxLogD> : butterfly_forward_kernel<S, kVec, 0>;
  }
  // the butterfly backward (for any d)
  static auto butterfly_backward(bool vec, bool grads) {
    if (vec) return grads ? butterfly_backward_kernel<S, true, true, 0> : butterfly_backward_kernel<S, true, false, 0>;
    return grads ? butterfly_backward_kernel<S, false, true, 0> : butterfly_backward_kernel<S, false, false, 0>;
  }
  static auto general_backward(bool grads) {
    return grads ? general_backward_kernel<S, true> : general_backward_kernel<S, false>;
  }
};

// Launchers<S> (chain_launch.h): each launches exactly one kernel.
template <class S>
void Launchers<S>::parallel_forward(bool vec, const ParallelArgs& a, const LaunchConfig& c, cudaStream_t s) {
  if (a.prefetch > 0) {
    launch(Kernels<S>::parallel_forward_prefetch(reg_fixed_width(a), a.reps > 1), c, s, a);
    return;
  }
  launch(Kernels<S>::parallel_forward(vec, a.table > 0, forward_rep_loop(a)), c, s, a);
}
template <class S>
void Launchers<S>::parallel_top_forward(const ParallelArgs& a, const LaunchConfig& c, cudaStream_t s) {
  launch(parallel_top_forward_kernel<S>, c, s, a);
}
// The parallel backward kernel for a (variant, table, reg instantiation, paired rows): the one rule of its launch
// and of the occupancy its persistent grid is sized by.
template <class S>
auto parallel_backward_for(bool vec, bool grads, const ParallelArgs& a) {
  if constexpr (sizeof(S) == 2) {  // the paired reg backward (reg_pair_applies: 16-bit activations only)
    if (a.pair == 2) {  // without the scale's gradient: rows of one segment (with or without the L2 prefetch), or
                        // segmented rows
      if (a.nseg == 1) {
        return a.pair_prefetch ? parallel_backward_pair_kernel<S, false, false>
                               : parallel_backward_pair_kernel<S, false, false, false>;
      }
      return parallel_backward_pair_kernel<S, true, false>;
    }
    if (a.pair > 0) return parallel_backward_pair_kernel<S, true, true>;
  }
  const int reg = a.reg > 0 ? (reg_fixed_width(a) ? 2 : 1) : 0;
  return Kernels<S>::parallel_backward(vec, grads, a.table > 0, reg);
}
template <class S>
void Launchers<S>::parallel_backward(bool vec, bool grads, const ParallelArgs& a, const LaunchConfig& c,
                                     cudaStream_t s) {
  launch(parallel_backward_for<S>(vec, grads, a), c, s, a);
}
template <class S>
int Launchers<S>::parallel_backward_occupancy(bool vec, bool grads, const ParallelArgs& a, int threads,
                                              size_t smem) {
  return occupancy(parallel_backward_for<S>(vec, grads, a), threads, smem);
}
// The stacked backward kernel for a (the reg stacked backward where a.reg, float accumulation only:
// stack_reg_applies; else the stacked kernel of its table variant): the one rule of its launch and of the occupancy
// its persistent grid is sized by.
template <class S>
auto parallel_stack_backward_for(bool vec, bool grads, const ParallelArgs& a) {
  if constexpr (sizeof(typename Elem<S>::A) == 4) {
    if (a.reg > 0) return parallel_stack_reg_kernel<S>;
  }
  return Kernels<S>::parallel_stack_backward(vec, grads, a.table > 0);
}
template <class S>
void Launchers<S>::parallel_stack_backward(bool vec, bool grads, const ParallelArgs& a, const LaunchConfig& c,
                                           cudaStream_t s) {
  launch(parallel_stack_backward_for<S>(vec, grads, a), c, s, a);
}
template <class S>
int Launchers<S>::parallel_stack_backward_occupancy(bool vec, bool grads, const ParallelArgs& a, int threads,
                                                    size_t smem) {
  return occupancy(parallel_stack_backward_for<S>(vec, grads, a), threads, smem);
}
template <class S>
void Launchers<S>::general_forward(const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s) {
  launch(general_forward_kernel<S>, c, s, a);
}
template <class S>
void Launchers<S>::butterfly_forward(bool vec, const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s) {
  const bool fixed = butterfly_fixed_width(a);
  launch(vec ? Kernels<S>::template butterfly_forward<true>(fixed) : Kernels<S>::template butterfly_forward<false>(fixed),
         c, s, a);
}
template <class S>
void Launchers<S>::butterfly_backward(bool vec, bool grads, const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s) {
  launch(Kernels<S>::butterfly_backward(vec, grads), c, s, a);
}
template <class S>
void Launchers<S>::general_backward(bool grads, const GeneralArgs& a, const LaunchConfig& c, cudaStream_t s) {
  launch(Kernels<S>::general_backward(grads), c, s, a);
}
template <class S>
int Launchers<S>::general_backward_occupancy(bool grads, int threads, size_t smem) {
  return occupancy(Kernels<S>::general_backward(grads), threads, smem);
}

}  // namespace qgoft::cuda::detail
