// Host emulation of the CUDA features the qgoft kernels use, so that chain_kernels.cuh compiles with a
// plain C++ compiler and its kernels run on the CPU. Blocks run one after another; shared memory is one
// global buffer; __syncthreads is a block-wide barrier; a warp shuffle writes the value into a per-warp
// buffer, waits at a warp-wide barrier, reads the partner's value and waits again. Two backends:
// * default: the CUDA threads of a block are fibers (ucontext) on one OS thread, switched at barriers,
//   round robin: deterministic and fast; a missing barrier shows up as a read of a value not yet written;
// * -DQGOFT_SIM_OS_THREADS: every CUDA thread is an OS thread (for ThreadSanitizer).
// A barrier not reached by every thread is reported as a deadlock. Testing only: it checks the kernels' indexing, synchronisation and arithmetic,
// not their performance; the real compiler may contract a*b + c*d into FMAs differently.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#ifndef QGOFT_SIM_OS_THREADS
#include <ucontext.h>
#endif

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n)

namespace qgoft_sim {

inline thread_local uint3 tls_thread_idx;

// Dynamic shared memory of the running block (allocated per block with its exact size, filled with
// NaN bytes, so that an address sanitizer sees out-of-bounds accesses).
inline unsigned char* g_dynamic_smem = nullptr;
inline size_t g_dynamic_smem_bytes = 0;
inline unsigned char* dynamic_smem() { return g_dynamic_smem; }

// __ldg is a global-memory load: on a GPU, a shared-memory address given to it is an illegal global access.
// The emulation has one address space, so it checks the address against the running block's shared memory.
inline void check_global(const void* p) {
  const auto* b = static_cast<const unsigned char*>(p);
  if (g_dynamic_smem != nullptr && b >= g_dynamic_smem && b < g_dynamic_smem + g_dynamic_smem_bytes) {
    std::fprintf(stderr, "cuda_host_sim: __ldg of a shared-memory address %p\n", p);
    std::abort();
  }
}

inline void check_align16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    std::fprintf(stderr, "cuda_host_sim: misaligned 16-byte access at %p\n", p);
    std::abort();
  }
}

#ifdef QGOFT_SIM_OS_THREADS
// A reusable barrier with a timeout (a deadlock aborts the process with a message).
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void arrive_and_wait(const char* what) {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t gen = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return generation_ != gen; })) {
      std::fprintf(stderr, "cuda_host_sim: DEADLOCK: %s not reached by all %d threads within 60 s\n", what,
                   count_);
      std::abort();
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  const int count_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
};
#else
void fiber_wait(const uint64_t* generation, uint64_t seen);

// Fiber barrier: the last to arrive releases the others, which are resumed by the scheduler.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void arrive_and_wait(const char*) {
    const uint64_t gen = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      return;
    }
    fiber_wait(&generation_, gen);
  }

 private:
  const int count_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
};
#endif

struct Warp {
  Barrier barrier{32};
  uint64_t buf[32] = {};
};

struct BlockContext {
  dim3 block_idx, block_dim, grid_dim;
  std::unique_ptr<Barrier> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local BlockContext* tls_block = nullptr;

inline void syncthreads() { tls_block->barrier->arrive_and_wait("__syncthreads"); }

template <class T>
inline T shfl_from(T v, int src_lane) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a word");
  Warp& w = *tls_block->warps[tls_thread_idx.x / 32];
  const int lane = tls_thread_idx.x % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.buf[lane] = bits;
  w.barrier.arrive_and_wait("warp shuffle");
  T r;
  std::memcpy(&r, &w.buf[src_lane & 31], sizeof(T));
  w.barrier.arrive_and_wait("warp shuffle");
  return r;
}

#ifdef QGOFT_SIM_OS_THREADS
// A pool of OS threads reused for every block.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: the detached workers outlive main's statics
    return *pool;
  }
  void run(BlockContext* ctx, int threads, const std::function<void()>* body) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (static_cast<int>(workers_.size()) < threads) {
      const int id = static_cast<int>(workers_.size());
      workers_.emplace_back([this, id] { loop(id); });
      workers_.back().detach();
    }
    ctx_ = ctx;
    body_ = body;
    active_ = threads;
    remaining_ = threads;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
  }

 private:
  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      BlockContext* ctx;
      const std::function<void()>* body;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        start_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (id >= active_) continue;
        ctx = ctx_;
        body = body_;
      }
      tls_thread_idx = make_uint3(id, 0, 0);
      tls_block = ctx;
      (*body)();
      std::lock_guard<std::mutex> lock(mutex_);
      if (--remaining_ == 0) done_.notify_one();
    }
  }
  std::mutex mutex_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  BlockContext* ctx_ = nullptr;
  const std::function<void()>* body_ = nullptr;
  int active_ = 0, remaining_ = 0;
  uint64_t generation_ = 0;
};
#else
// Round-robin fiber scheduler for one block at a time.
class Fibers {
 public:
  static Fibers& get() {
    static Fibers f;
    return f;
  }
  void run(BlockContext* ctx, int threads, const std::function<void()>* body) {
    while (static_cast<int>(stacks_.size()) < threads) stacks_.emplace_back(kStack);
    fibers_.assign(threads, FiberState{});
    body_ = body;
    for (int t = 0; t < threads; ++t) {
      FiberState& f = fibers_[t];
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = stacks_[t].data();
      f.ctx.uc_stack.ss_size = stacks_[t].size();
      f.ctx.uc_link = &main_;
      makecontext(&f.ctx, reinterpret_cast<void (*)()>(&Fibers::entry), 0);
    }
    tls_block = ctx;
    int finished = 0;
    while (finished < threads) {
      bool progress = false;
      for (int t = 0; t < threads; ++t) {
        FiberState& f = fibers_[t];
        if (f.done || (f.wait_gen != nullptr && *f.wait_gen == f.wait_seen)) continue;
        f.wait_gen = nullptr;
        current_ = t;
        tls_thread_idx = make_uint3(t, 0, 0);
        swapcontext(&main_, &f.ctx);
        progress = true;
        if (f.done) ++finished;
      }
      if (!progress) {
        std::fprintf(stderr, "cuda_host_sim: DEADLOCK: a barrier (__syncthreads or warp shuffle) is not "
                             "reached by every thread of the block\n");
        std::abort();
      }
    }
  }
  void wait(const uint64_t* generation, uint64_t seen) {
    FiberState& f = fibers_[current_];
    f.wait_gen = generation;
    f.wait_seen = seen;
    swapcontext(&f.ctx, &main_);
  }

 private:
  static constexpr size_t kStack = 128 * 1024;
  struct FiberState {
    ucontext_t ctx;
    bool done = false;
    const uint64_t* wait_gen = nullptr;
    uint64_t wait_seen = 0;
  };
  static void entry() {
    Fibers& self = get();
    (*self.body_)();
    self.fibers_[self.current_].done = true;  // returns to main_ through uc_link
  }
  std::vector<std::vector<char>> stacks_;
  std::vector<FiberState> fibers_;
  ucontext_t main_;
  int current_ = 0;
  const std::function<void()>* body_ = nullptr;
};

inline void fiber_wait(const uint64_t* generation, uint64_t seen) { Fibers::get().wait(generation, seen); }
#endif

// Run one block of a kernel (block_idx of grid) with `threads` CUDA threads.
template <class F>
void run_block(dim3 block_idx, dim3 grid, int threads, F&& body) {
  if (threads % 32 != 0 || threads > 1024) {
    std::fprintf(stderr, "cuda_host_sim: bad block size %d\n", threads);
    std::abort();
  }
  BlockContext ctx;
  ctx.block_idx = block_idx;
  ctx.block_dim = dim3(threads, 1, 1);
  ctx.grid_dim = grid;
  ctx.barrier = std::make_unique<Barrier>(threads);
  for (int w = 0; w < threads / 32; ++w) ctx.warps.push_back(std::make_unique<Warp>());
  const std::function<void()> fn = body;
#ifdef QGOFT_SIM_OS_THREADS
  Pool::get().run(&ctx, threads, &fn);
#else
  Fibers::get().run(&ctx, threads, &fn);
#endif
}

}  // namespace qgoft_sim

// The built-in variables and intrinsics, as the kernels spell them.
#define threadIdx (::qgoft_sim::tls_thread_idx)
#define blockIdx (::qgoft_sim::tls_block->block_idx)
#define blockDim (::qgoft_sim::tls_block->block_dim)
#define gridDim (::qgoft_sim::tls_block->grid_dim)

inline void __syncthreads() { ::qgoft_sim::syncthreads(); }

template <class T>
inline T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask) {
  return ::qgoft_sim::shfl_from(v, static_cast<int>(::qgoft_sim::tls_thread_idx.x % 32) ^ lane_mask);
}

template <class T>
inline T __shfl_sync(unsigned /*mask*/, T v, int src_lane) {
  return ::qgoft_sim::shfl_from(v, src_lane);
}

template <class T>
inline T __ldg(const T* p) {
  ::qgoft_sim::check_global(p);
  return *p;
}
