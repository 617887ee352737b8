// ATen glue of the CUDA backend: argument checks (common/checks.h, shared with the CPU glue), layout
// validation with a per-tensor cache, kernel selection and launch
// configuration, buffers, and the deterministic reduction of the parameter gradients. The kernels
// (chain_kernels.cuh) see raw pointers only. Design: docs/CUDA.md.
//
// Layout tensors (pairs, layer_offsets) live on the device like x (docs/CONTRACT.md). Validating them
// and recognising the parallel layout needs their values on the host: the first call with given layout
// tensors copies them to the host (a device synchronisation); the result is cached per tensor identity
// (device, data pointer, shape, strides, version counter; the cache keeps a reference so the memory
// cannot be reused while cached), so later calls never synchronise. In-place changes through PyTorch
// bump the version counter and are seen; writes that bypass it (through .data or raw pointers) are not.
// Inference tensors have no version counter: they are validated (synchronously) on every call.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "chain_cuda.h"
#include "chain_plan.h"
#include "chain_sizes.h"
#include "common/checks.h"

namespace qgoft {
namespace {

using at::Tensor;
namespace qc = qgoft::cuda;

// ------------------------------------------------------------------------------------------------
// Debug knobs (testing): QGOFT_CUDA_PATH=auto|general|global forces the general kernels, or the general
// kernels with their rows in global memory; QGOFT_CUDA_SEGMENT=<power of two in [256, 8192]> sets the
// segment width of the parallel kernels; QGOFT_CUDA_VERBOSE=1 prints each launch plan to stderr.
// ------------------------------------------------------------------------------------------------
constexpr size_t kLayoutCacheCapacity = 4096;

qc::Knobs knobs() {
  qc::Knobs k;
  const char* v = std::getenv("QGOFT_CUDA_PATH");
  if (v != nullptr && *v != '\0' && std::strcmp(v, "auto") != 0) {
    if (std::strcmp(v, "general") == 0) {
      k.path = qc::ForcedPath::General;
    } else if (std::strcmp(v, "global") == 0) {
      k.path = qc::ForcedPath::Global;
    } else {
      TORCH_CHECK(false, "QGOFT_CUDA_PATH must be auto, general or global, got '", v, "'");
    }
  }
  const char* seg = std::getenv("QGOFT_CUDA_SEGMENT");
  if (seg != nullptr && *seg != '\0') {
    const long w = std::strtol(seg, nullptr, 10);
    TORCH_CHECK(w >= 256 && w <= 8192 && (w & (w - 1)) == 0,
                "QGOFT_CUDA_SEGMENT must be a power of two in [256, 8192], got '", seg, "'");
    k.segment = static_cast<int>(w);
  }
  return k;
}

bool verbose() {
  const char* v = std::getenv("QGOFT_CUDA_VERBOSE");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// ------------------------------------------------------------------------------------------------
// Layout validation and cache.
// ------------------------------------------------------------------------------------------------
struct Layout {
  Tensor pairs_keep, offsets_keep;  // the caller's tensors (kept alive while cached)
  Tensor pairs;                     // (P, 2) int32 contiguous, 8-byte aligned, on the device
  Tensor offsets;                   // (L + 1,) int32 contiguous, on the device
  int64_t d = 0, num_pairs = 0, num_layers = 0;
  int64_t parallel_reps = 0;        // k when exactly layouts.stack(layouts.parallel(d), k) (k = 1: the layout)
  int butterfly_reps = 0;           // k when exactly layouts.stack(layouts.butterfly(d), k), d = 2^n (qc::butterfly_reps)
};

struct LayoutKey {
  int device;
  uintptr_t pairs_ptr, offsets_ptr;
  int64_t pairs_rows, pairs_s0, pairs_s1, offsets_n, offsets_s;
  int64_t pairs_version, offsets_version;
  int64_t d;
  bool operator==(const LayoutKey& o) const {
    return device == o.device && pairs_ptr == o.pairs_ptr && offsets_ptr == o.offsets_ptr &&
           pairs_rows == o.pairs_rows && pairs_s0 == o.pairs_s0 && pairs_s1 == o.pairs_s1 &&
           offsets_n == o.offsets_n && offsets_s == o.offsets_s &&
           pairs_version == o.pairs_version && offsets_version == o.offsets_version && d == o.d;
  }
};

struct LayoutKeyHash {
  size_t operator()(const LayoutKey& k) const {
    size_t h = std::hash<uintptr_t>()(k.pairs_ptr);
    auto mix = [&h](uint64_t v) { h ^= std::hash<uint64_t>()(v) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2); };
    mix(k.offsets_ptr);
    mix(static_cast<uint64_t>(k.device));
    mix(static_cast<uint64_t>(k.pairs_rows));
    mix(static_cast<uint64_t>(k.offsets_n));
    mix(static_cast<uint64_t>(k.pairs_version));
    mix(static_cast<uint64_t>(k.offsets_version));
    mix(static_cast<uint64_t>(k.d));
    return h;
  }
};

class LayoutCache {
 public:
  std::shared_ptr<const Layout> find(const LayoutKey& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = map_.find(key);
    if (it == map_.end()) return nullptr;
    lru_.splice(lru_.begin(), lru_, it->second);
    return it->second->second;
  }
  void insert(const LayoutKey& key, std::shared_ptr<const Layout> value) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (map_.count(key) != 0) return;
    lru_.emplace_front(key, std::move(value));
    map_[key] = lru_.begin();
    while (lru_.size() > kLayoutCacheCapacity) {
      map_.erase(lru_.back().first);
      lru_.pop_back();
    }
  }

 private:
  std::mutex mutex_;
  std::list<std::pair<LayoutKey, std::shared_ptr<const Layout>>> lru_;
  std::unordered_map<LayoutKey, decltype(lru_)::iterator, LayoutKeyHash> map_;
};

LayoutCache& layout_cache() {
  static auto* cache = new LayoutCache();  // leaked on purpose: no destruction-order issues at exit
  return *cache;
}

// k >= 1 when the layout is exactly layouts.parallel(d) repeated k times (layouts.stack; k = 1: the
// layout itself), else 0. The values were validated (check_layout_values) already.
int64_t parallel_reps(const int32_t* pp, const int32_t* off, int64_t num_pairs, int64_t num_layers, int64_t d) {
  int64_t levels = 0;
  while ((int64_t(1) << levels) < d) ++levels;
  if (d < 2 || levels == 0 || num_layers % levels != 0 || num_layers == 0) return 0;
  const int64_t reps = num_layers / levels;
  if (num_pairs != reps * (d - 1)) return 0;
  int64_t p = 0;
  for (int64_t k = 0; k < reps; ++k) {
    for (int64_t r = 1; r <= levels; ++r) {
      if (off[k * levels + r - 1] != p) return 0;
      const int64_t h = int64_t(1) << (r - 1), step = int64_t(1) << r;
      for (int64_t i = 0; i + h < d; i += step, ++p) {
        if (pp[2 * p] != i || pp[2 * p + 1] != i + h) return 0;
      }
      if (off[k * levels + r] != p) return 0;
    }
  }
  return p == num_pairs ? reps : 0;
}

// Validates the values of pairs / layer_offsets against d (common/checks.h) on a host copy, once per
// tensor version. The tensors themselves (device, dtype, shape) are checked already.
std::shared_ptr<const Layout> checked_layout(const Tensor& pairs, const Tensor& offsets,
                                             const Tensor& x, int64_t d, const char* op) {
  const bool cacheable = !pairs.is_inference() && !offsets.is_inference();
  LayoutKey key{};
  if (cacheable) {
    key = LayoutKey{x.get_device(),
                    reinterpret_cast<uintptr_t>(pairs.data_ptr()),
                    reinterpret_cast<uintptr_t>(offsets.data_ptr()),
                    pairs.size(0), pairs.stride(0), pairs.stride(1), offsets.numel(),
                    offsets.stride(0), pairs._version(), offsets._version(), d};
    if (auto hit = layout_cache().find(key)) return hit;
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream().stream(), &capture));
  TORCH_CHECK(capture == cudaStreamCaptureStatusNone, op,
              ": these pairs / layer_offsets tensors are used for the first time (or were modified) "
              "during CUDA graph capture; validating them needs a device-to-host copy. Run the op "
              "once with the same tensors before capturing.");

  auto layout = std::make_shared<Layout>();
  const Tensor ph = pairs.to(at::kCPU).contiguous();  // synchronises the current stream
  const Tensor oh = offsets.to(at::kCPU).contiguous();
  const int32_t* pp = ph.const_data_ptr<int32_t>();
  const int32_t* off = oh.const_data_ptr<int32_t>();
  const int64_t num_pairs = ph.size(0), num_layers = oh.numel() - 1;
  check_layout_values(pp, num_pairs, off, num_layers, d, op);
  layout->d = d;
  layout->num_pairs = num_pairs;
  layout->num_layers = num_layers;
  layout->parallel_reps = parallel_reps(pp, off, num_pairs, num_layers, d);
  layout->butterfly_reps = layout->parallel_reps == 0 ? qc::butterfly_reps(pp, off, num_pairs, num_layers, d) : 0;
  layout->pairs = pairs.contiguous();
  if (reinterpret_cast<uintptr_t>(layout->pairs.data_ptr()) % 8 != 0) {
    layout->pairs = layout->pairs.clone(at::MemoryFormat::Contiguous);
  }
  layout->offsets = offsets.contiguous();
  if (cacheable) {
    layout->pairs_keep = pairs;
    layout->offsets_keep = offsets;
    layout_cache().insert(key, layout);
  }
  return layout;
}

// ------------------------------------------------------------------------------------------------
// Operands.
// ------------------------------------------------------------------------------------------------

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

struct Operands {
  qc::DType dtype = qc::DType::Float32;
  at::ScalarType acc = at::kFloat;
  int64_t d = 0, rows = 0;
  std::shared_ptr<const Layout> layout;
  Tensor blocks;  // (P, 4) acc, contiguous, 16-byte aligned
  Tensor scale;   // (d,) acc contiguous, or undefined
};

// What the shared checks (common/checks.h) need to know of a tensor.
TensorMeta meta_of(const Tensor& t) {
  TensorMeta m;
  m.dtype = t.scalar_type();
  m.sizes = t.sizes().vec();
  m.device = t.device().str();
  return m;
}

// x (..., d) as rows (rows, d) with unit stride along d (common/checks.h: num_rows, rows_need_copy).
Tensor rows_view(const Tensor& x, int64_t d) {
  Tensor x2 = x.reshape({num_rows(x.sizes().vec()), d});
  return rows_need_copy(d, x2.stride(1), x2.is_contiguous()) ? x2.contiguous() : x2;
}

// Checks every argument (common/checks.h) and the layout; the blocks are made by the caller.
Operands prepare(const Tensor& x, const Tensor& params, bool givens, const Tensor& pairs,
                 const Tensor& offsets, const std::optional<Tensor>& scale, const Tensor* grad_out,
                 const char* op, const std::optional<Tensor>* tops = nullptr) {
  Operands o;
  o.dtype = check_chain_tensors(meta_of, x, params, givens, pairs, offsets, scale, grad_out, op, tops);
  // Every tensor is on x's device; the dispatcher only sends CUDA work here.
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  o.d = x.size(-1);
  o.acc = accumulation_type(o.dtype);
  o.layout = checked_layout(pairs, offsets, x, o.d, op);
  o.rows = num_rows(x.sizes().vec());
  if (scale.has_value()) o.scale = scale->to(o.acc).contiguous();
  return o;
}

Tensor aligned_blocks(Tensor b) {
  b = b.contiguous();
  if (!aligned16(b.const_data_ptr())) b = b.clone(at::MemoryFormat::Contiguous);
  return b;
}

Tensor rotation_blocks(const Tensor& angles, at::ScalarType acc, cudaStream_t stream) {
  const int64_t num_pairs = angles.size(0);
  Tensor blocks = at::empty({num_pairs, 4}, angles.options().dtype(acc));
  if (num_pairs == 0) return blocks;
  Tensor a = angles;
  if ((a.scalar_type() != at::kFloat && a.scalar_type() != at::kDouble) || !a.is_contiguous()) {
    a = a.to(acc).contiguous();
  }
  qc::GivensArgs args;
  args.angles = a.const_data_ptr();
  args.blocks = blocks.mutable_data_ptr();
  args.num_pairs = num_pairs;
  qc::givens_blocks(acc == at::kDouble, a.scalar_type() == at::kDouble, args, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return blocks;
}

// Of the current device, queried once per device (the glue needs no CUDA library beyond the runtime).
qc::Limits device_limits() {
  static std::mutex mutex;
  static std::unordered_map<int, qc::Limits> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mutex);
  auto it = known.find(device);
  if (it != known.end()) return it->second;
  int sms = 0, optin = 0, plain = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&plain, cudaDevAttrMaxSharedMemoryPerBlock, device));
  qc::Limits lim;
  lim.sm_count = std::max(sms, 1);
  lim.smem_optin = std::max(optin, plain);
  known.emplace(device, lim);
  return lim;
}

int occupancy(qc::DType dtype, qc::BackwardKernel kernel, bool vec, bool grads, int threads, size_t smem,
              const qc::ParallelArgs& pa) {
  int blocks = 1;
  switch (kernel) {
    case qc::BackwardKernel::Parallel:
      blocks = qc::parallel_backward_occupancy(dtype, vec, grads, pa, threads, smem);
      break;
    case qc::BackwardKernel::ParallelStack:
      blocks = qc::parallel_stack_backward_occupancy(dtype, vec, grads, pa, threads, smem);
      break;
    case qc::BackwardKernel::General: blocks = qc::general_backward_occupancy(dtype, grads, threads, smem); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();  // surfaces a failed cudaFuncSetAttribute
  return blocks;
}

void log_plan(const char* op, const char* what, const std::string& detail) {
  if (verbose()) std::fprintf(stderr, "qgoft.cuda: %s %s %s\n", op, what, detail.c_str());
}

qc::Problem problem(const Operands& o) {
  qc::Problem p;
  p.dtype = o.dtype;
  p.rows = o.rows;
  p.d = o.d;
  p.num_pairs = o.layout->num_pairs;
  p.num_layers = o.layout->num_layers;
  p.parallel_layout = o.layout->parallel_reps == 1;
  p.parallel_reps = o.layout->parallel_reps > 1 ? static_cast<int>(o.layout->parallel_reps) : 0;
  p.butterfly_reps = o.layout->butterfly_reps;
  return p;
}

void set_params(const Operands& o, qc::ParallelArgs& pa, qc::GeneralArgs& ga) {
  pa.blocks = ga.blocks = o.blocks.const_data_ptr();
  pa.scale = ga.scale = o.scale.defined() ? o.scale.const_data_ptr() : nullptr;
  ga.pairs = o.layout->pairs.const_data_ptr<int32_t>();
  ga.offsets = o.layout->offsets.const_data_ptr<int32_t>();
}

void check_smem(const qc::LaunchConfig& c, const qc::Limits& lim, const char* op) {
  TORCH_CHECK(static_cast<int64_t>(c.smem) <= lim.smem_optin, op, ": internal error: a kernel needs ",
              c.smem, " bytes of shared memory, the device allows ", lim.smem_optin);
}

// ------------------------------------------------------------------------------------------------
// Forward. Returns the segment tops for the backward (rows, nseg) where the plan keeps them
// (ForwardPlan::tops_for_backward), else an undefined tensor.
// ------------------------------------------------------------------------------------------------
Tensor run_forward(const Operands& o, const Tensor& x2, Tensor& y, const char* op) {
  const qc::Limits lim = device_limits();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  qc::Problem p = problem(o);
  p.x = x2.const_data_ptr();
  p.x_ld = x2.stride(0);
  p.out = y.mutable_data_ptr();
  qc::ForwardPlan plan = qc::plan_forward(p, lim, knobs());
  log_plan(op, "forward", plan.describe);
  set_params(o, plan.pa, plan.ga);
  check_smem(plan.main, lim, op);
  const auto acc_opts = x2.options().dtype(o.acc);
  if (plan.butterfly) {
    qc::butterfly_forward(o.dtype, plan.vec, plan.ga, plan.main, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {};
  }
  if (plan.parallel) {
    Tensor top;
    if (plan.top_pass) {
      top = at::empty({plan.top_elems}, acc_opts);
      plan.pa.top = top.mutable_data_ptr();
    }
    qc::parallel_forward(o.dtype, plan.vec, plan.pa, plan.main, stream);  // a.reps: repetitions
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (plan.top_pass) {
      qc::parallel_top_forward(o.dtype, plan.pa, plan.top, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // the main kernel's segment starts, which the top kernel reads and never writes
    if (plan.tops_for_backward) return top.view({o.rows, plan.pa.nseg});
    return {};
  }
  Tensor workspace;
  if (plan.workspace_elems > 0) {
    workspace = at::empty({plan.workspace_elems}, acc_opts);
    plan.ga.workspace = workspace.mutable_data_ptr();
  }
  qc::general_forward(o.dtype, plan.ga, plan.main, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {};
}

// ------------------------------------------------------------------------------------------------
// Backward. Returns grad_x (rows, d) and, in the accumulation type, the block gradients (P, 4) or the
// angle gradients (P,) and the scale gradient (d,); undefined where not requested.
// ------------------------------------------------------------------------------------------------
struct BackwardResult {
  Tensor grad_x, grad_params, grad_scale;
};

// tops: the forward's segment tops (checked by prepare: x's device, the accumulation type, (rows, k)); used
// where the plan needs k of them (BackwardPlan::top_cols) instead of the top pass; refused with another k.
BackwardResult run_backward(const Operands& o, const Tensor& x, const Tensor& grad_out,
                            bool want_x, bool want_params, bool want_scale, bool givens,
                            const std::optional<Tensor>& tops, const char* op) {
  BackwardResult res;
  const int64_t rows = o.rows, d = o.d, num_pairs = o.layout->num_pairs;
  want_scale = want_scale && o.scale.defined();
  const bool grads = want_params || want_scale;
  const auto acc_opts = x.options().dtype(o.acc);
  if (want_x) res.grad_x = at::empty({rows, d}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (rows == 0 || d == 0) {
    if (want_params) {
      res.grad_params = givens ? at::zeros({num_pairs}, acc_opts) : at::zeros({num_pairs, 4}, acc_opts);
    }
    if (want_scale) res.grad_scale = at::zeros({d}, acc_opts);
    return res;
  }
  if (!want_x && !grads) return res;

  const qc::Limits lim = device_limits();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const Tensor g2 = rows_view(grad_out.scalar_type() == x.scalar_type() ? grad_out
                                                                        : grad_out.to(x.scalar_type()), d);
  Tensor x2;
  if (grads) x2 = rows_view(x, d);  // the adjoint (grad_x only) never reads x
  qc::Problem p = problem(o);
  p.grad = g2.const_data_ptr();
  p.grad_ld = g2.stride(0);
  p.out = want_x ? res.grad_x.mutable_data_ptr() : nullptr;
  if (grads) {
    p.x = x2.const_data_ptr();
    p.x_ld = x2.stride(0);
  }
  p.want_x = want_x;
  p.want_blocks = want_params;
  p.want_scale = want_scale;
  p.givens = givens;
  Tensor saved_tops;
  if (tops.has_value() && tops->size(1) > 0) {
    saved_tops = tops->contiguous();
    p.tops = saved_tops.const_data_ptr();
    p.tops_cols = saved_tops.size(1);
  }
  const qc::DType dtype = o.dtype;
  qc::BackwardPlan plan = qc::plan_backward(
      p, lim, knobs(),
      [dtype](qc::BackwardKernel kernel, bool vec, bool g, int threads, size_t smem, const qc::ParallelArgs& pa) {
        return occupancy(dtype, kernel, vec, g, threads, smem, pa);
      });
  log_plan(op, "backward", plan.describe);
  TORCH_CHECK(p.tops_cols == 0 || plan.top_cols == 0 || p.tops_cols == plan.top_cols, op,
              ": tops must have shape (rows, segments) = (", rows, ", ", plan.top_cols,
              ") for this backward's segments (the forward's tops of this x), got ", saved_tops.sizes());
  set_params(o, plan.pa, plan.ga);
  check_smem(plan.main, lim, op);

  Tensor partial, top, workspace;
  if (plan.grads) {
    partial = at::empty({plan.slots, plan.partial_ld}, acc_opts);
    plan.pa.partial = plan.ga.partial = partial.mutable_data_ptr();
  }
  if (plan.butterfly) {
    qc::butterfly_backward(dtype, plan.vec, plan.grads, plan.ga, plan.main, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (plan.parallel) {
    if (plan.top_pass) {
      top = at::empty({plan.top_elems}, acc_opts);
      plan.pa.top = top.mutable_data_ptr();
      // the forward kernel recomputing the segment starts only
      qc::parallel_forward(dtype, plan.vec, plan.top_args(), plan.top, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (plan.pa.reps > 1) {
      qc::parallel_stack_backward(dtype, plan.vec, plan.grads, plan.pa, plan.main, stream);
    } else {
      qc::parallel_backward(dtype, plan.vec, plan.grads, plan.pa, plan.main, stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    if (plan.workspace_elems > 0) {
      workspace = at::empty({plan.workspace_elems}, acc_opts);
      plan.ga.workspace = workspace.mutable_data_ptr();
    }
    qc::general_backward(dtype, plan.grads, plan.ga, plan.main, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  if (plan.grads) {
    if (want_params) {
      res.grad_params = givens ? at::empty({num_pairs}, acc_opts) : at::empty({num_pairs, 4}, acc_opts);
    }
    if (want_scale) res.grad_scale = at::empty({d}, acc_opts);
    plan.set_reduce_outputs(partial.const_data_ptr(), o.blocks.const_data_ptr(),
                            want_params ? res.grad_params.mutable_data_ptr() : nullptr,
                            want_scale ? res.grad_scale.mutable_data_ptr() : nullptr);
    qc::reduce_partials(o.acc == at::kDouble, givens && !plan.angle_sums, plan.ra, plan.reduce, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (plan.reduce_scale_launch) {  // the butterfly backward's angle sums: the scale's columns on their own
      qc::reduce_partials(o.acc == at::kDouble, false, plan.ra_scale, plan.reduce_scale, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return res;
}

Tensor empty_like_flat(const Tensor& t) { return at::empty({0}, t.options()); }

// ------------------------------------------------------------------------------------------------
// Entry points: params are the angles (P,) (givens) or the quasi-Givens blocks (P, 2, 2).
// ------------------------------------------------------------------------------------------------
// The (P, 4) blocks of the chain in the accumulation type (params checked by prepare()).
Tensor chain_blocks(const Tensor& params, bool givens, at::ScalarType acc) {
  if (givens) return rotation_blocks(params, acc, c10::cuda::getCurrentCUDAStream().stream());
  return aligned_blocks(params.reshape({params.size(0), 4}).to(acc));
}

// The forward: y (x's shape) and, with want_tops, the backward's segment tops: (rows, nseg) where the forward's plan
// keeps them, else (rows, 0) (docs/CUDA.md, "Saved segment tops"); undefined without want_tops.
template <bool kGivens>
std::tuple<Tensor, Tensor> forward_op(const Tensor& x, const Tensor& params, const Tensor& pairs,
                                      const Tensor& layer_offsets, const std::optional<Tensor>& scale, bool want_tops) {
  const char* op = chain_op_name(kGivens, /*backward=*/false);
  c10::cuda::OptionalCUDAGuard guard;
  if (x.is_cuda()) guard.set_device(x.device());
  Operands o = prepare(x, params, kGivens, pairs, layer_offsets, scale, nullptr, op);
  o.blocks = chain_blocks(params, kGivens, o.acc);
  const Tensor x2 = rows_view(x, o.d);
  Tensor y = at::empty({o.rows, o.d}, x.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor tops;
  if (o.rows > 0 && o.d > 0) tops = run_forward(o, x2, y, op);
  if (want_tops && !tops.defined()) tops = at::empty({o.rows, 0}, x.options().dtype(o.acc));
  return {y.view(x.sizes()), tops};
}

template <bool kGivens>
Tensor chain_cuda(const Tensor& x, const Tensor& params, const Tensor& pairs, const Tensor& layer_offsets,
                  const std::optional<Tensor>& scale) {
  return std::get<0>(forward_op<kGivens>(x, params, pairs, layer_offsets, scale, /*want_tops=*/false));
}

template <bool kGivens>
std::tuple<Tensor, Tensor> chain_with_tops_cuda(const Tensor& x, const Tensor& params, const Tensor& pairs,
                                                const Tensor& layer_offsets, const std::optional<Tensor>& scale) {
  return forward_op<kGivens>(x, params, pairs, layer_offsets, scale, /*want_tops=*/true);
}

template <bool kGivens>
std::tuple<Tensor, Tensor, Tensor> chain_backward_cuda(const Tensor& grad_out, const Tensor& x, const Tensor& params,
                                                       const Tensor& pairs, const Tensor& layer_offsets,
                                                       const std::optional<Tensor>& scale,
                                                       std::array<bool, 3> output_mask,
                                                       const std::optional<Tensor>& tops) {
  const char* op = chain_op_name(kGivens, /*backward=*/true);
  c10::cuda::OptionalCUDAGuard guard;
  if (x.is_cuda()) guard.set_device(x.device());
  Operands o = prepare(x, params, kGivens, pairs, layer_offsets, scale, &grad_out, op, &tops);
  o.blocks = chain_blocks(params, kGivens, o.acc);
  BackwardResult r = run_backward(o, x, grad_out, output_mask[0], output_mask[1], output_mask[2],
                                  kGivens, tops, op);
  return {r.grad_x.defined() ? r.grad_x.view(x.sizes()) : empty_like_flat(x),
          r.grad_params.defined() ? r.grad_params.view(params.sizes()).to(params.scalar_type())
                                  : empty_like_flat(params),
          r.grad_scale.defined() ? r.grad_scale.to(scale->scalar_type()) : empty_like_flat(params)};
}

}  // namespace
}  // namespace qgoft

TORCH_LIBRARY_IMPL(qgoft, CUDA, m) {
  m.impl("givens_chain", &qgoft::chain_cuda<true>);
  m.impl("givens_chain_backward", &qgoft::chain_backward_cuda<true>);
  m.impl("quasi_givens_chain", &qgoft::chain_cuda<false>);
  m.impl("quasi_givens_chain_backward", &qgoft::chain_backward_cuda<false>);
  m.impl("givens_chain_with_tops", &qgoft::chain_with_tops_cuda<true>);
  m.impl("quasi_givens_chain_with_tops", &qgoft::chain_with_tops_cuda<false>);
}
