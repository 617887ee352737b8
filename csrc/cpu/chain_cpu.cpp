// Glue of the CPU backend, on PyTorch's stable ABI (torch::stable, docs/BUILD.md): argument checks
// (common/checks.h, shared with the CUDA glue), dtype dispatch, threading (torch's own thread pool through
// torch::stable::parallel_for) and the deterministic reduction of the parameter gradients. The kernels
// (chain_kernel_*.cpp) see raw pointers only.
#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "chain_kernel.h"
#include "common/checks.h"
#include "common/stable_tensor.h"

namespace qgoft {
namespace {

using stable::Tensor;

// Deterministic chunking of the rows for the parameter-gradient reduction: it depends only on the
// problem size and the kernel's tile height, never on the number of threads.
constexpr int64_t kMinTilesPerChunk = 8;
constexpr int64_t kMaxChunks = 64;
// Rough amount of elements a forward task should touch before it is worth a thread.
constexpr int64_t kForwardGrainElements = 1 << 15;

// Calls f(T{}) with T = double for a Double accumulation type, float otherwise.
template <class F>
void dispatch_acc(ScalarType acc, F&& f) {
  if (acc == ScalarType::Double) {
    f(double{});
  } else {
    f(float{});
  }
}

// Blocks (c, -s, s, c) of the angles, in the accumulation type. A plain loop on purpose: P is small and
// a vectorised cos/sin would open a parallel region, whose wake-up costs more than the work.
Tensor rotation_blocks(const Tensor& angles, ScalarType acc) {
  const Tensor a = stable::contiguous_as(angles, acc);
  const int64_t num_pairs = a.size(0);
  Tensor blocks = stable::empty_on(a, {num_pairs, 4}, acc);
  dispatch_acc(acc, [&](auto zero) {
    using T = decltype(zero);
    const T* ap = static_cast<const T*>(a.const_data_ptr());
    T* bp = static_cast<T*>(blocks.mutable_data_ptr());
    for (int64_t p = 0; p < num_pairs; ++p) {
      const T c = std::cos(ap[p]), s = std::sin(ap[p]);
      bp[4 * p] = c;
      bp[4 * p + 1] = -s;
      bp[4 * p + 2] = s;
      bp[4 * p + 3] = c;
    }
  });
  return blocks;
}

// d/dtheta of the block entries (c, -s, s, c) is (-s, -c, c, -s): chain rule on the block gradients.
Tensor angle_grads(const Tensor& blocks, const Tensor& grad_blocks, ScalarType acc) {
  const int64_t num_pairs = blocks.size(0);
  Tensor out = stable::empty_on(blocks, {num_pairs}, acc);
  dispatch_acc(acc, [&](auto zero) {
    using T = decltype(zero);
    const T* b = static_cast<const T*>(blocks.const_data_ptr());
    const T* g = static_cast<const T*>(grad_blocks.const_data_ptr());
    T* o = static_cast<T*>(out.mutable_data_ptr());
    for (int64_t p = 0; p < num_pairs; ++p) {
      const T c = b[4 * p], s = b[4 * p + 2];
      o[p] = -s * g[4 * p] - c * g[4 * p + 1] + c * g[4 * p + 2] - s * g[4 * p + 3];
    }
  });
  return out;
}

// Everything a kernel call needs, validated.
struct Operands {
  Tensor x2;      // (rows, d)
  Tensor pairs;   // (P, 2) int32 contiguous
  Tensor blocks;  // (P, 4) accumulation type
  std::optional<Tensor> scale;  // (d,) accumulation type
  ScalarType acc = ScalarType::Float;
  cpu::ChainParams params;
  int64_t rows = 0;
};

// Checks every argument (common/checks.h) and the layout values, and builds the kernel parameters.
// params: the angles (P,) (givens) or the quasi-Givens blocks (P, 2, 2); grad_out, tops: backward only.
Operands prepare(const Tensor& x, const Tensor& params, bool givens, const Tensor& pairs,
                 const Tensor& offsets, const std::optional<Tensor>& scale, const Tensor* grad_out,
                 const char* op, const std::optional<Tensor>* tops = nullptr) {
  Operands o;
  o.params.dtype =
      check_chain_tensors(stable::meta_of, x, params, givens, pairs, offsets, scale, grad_out, op, tops);
  const int64_t d = x.size(-1);
  o.acc = accumulation_type(o.params.dtype);
  o.pairs = stable::contiguous_as(pairs, ScalarType::Int);
  const Tensor oc = stable::contiguous_as(offsets, ScalarType::Int);
  const int64_t num_pairs = pairs.size(0);
  check_layout_values(static_cast<const int32_t*>(o.pairs.const_data_ptr()), num_pairs,
                      static_cast<const int32_t*>(oc.const_data_ptr()), offsets.size(0) - 1, d,
                      op);
  o.x2 = stable::rows_view(x, d);
  o.rows = num_rows(stable::sizes_of(x));
  o.blocks = givens ? rotation_blocks(params, o.acc)
                    : stable::contiguous_as(torch::stable::reshape(params, {num_pairs, 4}), o.acc);
  if (scale.has_value()) o.scale = stable::contiguous_as(*scale, o.acc);
  o.params.d = d;
  o.params.num_pairs = num_pairs;
  o.params.pairs = static_cast<const int32_t*>(o.pairs.const_data_ptr());
  o.params.blocks = o.blocks.const_data_ptr();
  o.params.scale = o.scale.has_value() ? o.scale->const_data_ptr() : nullptr;
  return o;
}

Tensor forward(const Operands& o, const Tensor& x) {
  const int64_t rows = o.rows, d = o.params.d;
  Tensor y = stable::empty_on(x, {rows, d}, x.scalar_type());
  if (rows > 0 && d > 0) {
    const int64_t tile = cpu::tile_rows(o.params.dtype, d);
    const int64_t tiles = (rows + tile - 1) / tile;
    const int64_t grain = std::max<int64_t>(1, kForwardGrainElements / (tile * d));
    const void* xp = o.x2.const_data_ptr();
    void* yp = y.mutable_data_ptr();
    const int64_t ld = o.x2.stride(0);
    const cpu::ChainParams& params = o.params;
    torch::stable::parallel_for(0, tiles, grain, [&](int64_t b, int64_t e) {
      cpu::chain_forward(params, xp, ld, yp, b * tile, std::min(e * tile, rows));
    });
  }
  return torch::stable::view(y, x.sizes());
}

struct Grads {
  std::optional<Tensor> x, blocks, scale;  // (rows, d); (P, 4) acc; (d,) acc
};

// Fixed chunks of rows, each reduced by the kernel into its own partial sums, then summed in chunk
// order: bitwise reproducible for any thread count.
Grads backward(const Operands& o, const Tensor& grad_out, const Tensor& x, bool want_x, bool want_blocks,
               bool want_scale) {
  const int64_t rows = o.rows, d = o.params.d, num_pairs = o.params.num_pairs;
  want_scale = want_scale && o.scale.has_value();
  const Tensor g2 = stable::rows_view(stable::as_dtype(grad_out, x.scalar_type()), d);
  const int64_t g_ld = g2.stride(0);
  const void* gp = g2.const_data_ptr();
  Grads out;
  if (want_x) out.x = stable::empty_on(x, {rows, d}, x.scalar_type());
  void* gxp = want_x ? out.x->mutable_data_ptr() : nullptr;
  const int64_t tile = cpu::tile_rows(o.params.dtype, d);
  const int64_t tiles = (rows + tile - 1) / tile;
  const cpu::ChainParams& params = o.params;

  if (!want_blocks && !want_scale) {
    if (want_x && rows > 0 && d > 0) {  // adjoint only: x is not read
      const int64_t grain = std::max<int64_t>(1, kForwardGrainElements / (tile * d));
      torch::stable::parallel_for(0, tiles, grain, [&](int64_t b, int64_t e) {
        cpu::chain_backward(params, gp, g_ld, nullptr, 0, gxp, b * tile, std::min(e * tile, rows), nullptr,
                            nullptr);
      });
    }
    return out;
  }
  const int64_t tiles_per_chunk = std::max(kMinTilesPerChunk, (tiles + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = std::max<int64_t>(1, (tiles + tiles_per_chunk - 1) / tiles_per_chunk);
  const int64_t width = 4 * num_pairs + d;
  const Tensor partial = stable::zeros_on(x, {chunks, width}, o.acc);
  const int64_t elem = static_cast<int64_t>(partial.element_size());
  char* partial_base = static_cast<char*>(partial.mutable_data_ptr());
  const void* xp = o.x2.const_data_ptr();
  const int64_t x_ld = o.x2.stride(0);
  if (rows > 0 && d > 0) {
    torch::stable::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        const int64_t r0 = c * tiles_per_chunk * tile;
        const int64_t r1 = std::min(rows, r0 + tiles_per_chunk * tile);
        char* base = partial_base + c * width * elem;
        void* pb = want_blocks ? base : nullptr;
        void* ps = want_scale ? base + 4 * num_pairs * elem : nullptr;
        cpu::chain_backward(params, gp, g_ld, xp, x_ld, gxp, r0, r1, pb, ps);
      }
    });
  }
  // Separate tensors: the op's schema promises outputs that alias nothing.
  if (want_blocks) out.blocks = stable::empty_on(x, {num_pairs, 4}, o.acc);
  if (want_scale) out.scale = stable::empty_on(x, {d}, o.acc);
  dispatch_acc(o.acc, [&](auto zero) {
    using T = decltype(zero);
    const T* src = reinterpret_cast<const T*>(partial_base);
    T* dst_blocks = want_blocks ? static_cast<T*>(out.blocks->mutable_data_ptr()) : nullptr;
    T* dst_scale = want_scale ? static_cast<T*>(out.scale->mutable_data_ptr()) : nullptr;
    // Threads only pay off for large reductions (each task: >= ~256K additions).
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / chunks);
    torch::stable::parallel_for(0, width, grain, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        T s = src[k];
        for (int64_t c = 1; c < chunks; ++c) s += src[c * width + k];
        if (k < 4 * num_pairs) {
          if (dst_blocks != nullptr) dst_blocks[k] = s;
        } else if (dst_scale != nullptr) {
          dst_scale[k - 4 * num_pairs] = s;
        }
      }
    });
  });
  return out;
}

Tensor empty_like_flat(const Tensor& t) { return stable::empty_on(t, {0}, t.scalar_type()); }

std::tuple<Tensor, Tensor, Tensor> backward_outputs(Grads g, const Operands& o, const Tensor& x,
                                                    const Tensor& params, bool givens,
                                                    const std::optional<Tensor>& scale) {
  Tensor gx = g.x.has_value() ? torch::stable::view(*g.x, x.sizes()) : empty_like_flat(x);
  Tensor gp = empty_like_flat(params);
  if (g.blocks.has_value()) {
    gp = givens ? stable::as_dtype(angle_grads(o.blocks, *g.blocks, o.acc), params.scalar_type())
                : stable::as_dtype(torch::stable::view(*g.blocks, params.sizes()), params.scalar_type());
  }
  Tensor gs = g.scale.has_value() ? stable::as_dtype(*g.scale, scale->scalar_type()) : empty_like_flat(params);
  return {gx, gp, gs};
}

// The entry points: params are the angles (P,) (kGivens) or the quasi-Givens blocks (P, 2, 2).
template <bool kGivens>
Tensor chain_cpu(Tensor x, Tensor params, Tensor pairs, Tensor layer_offsets, std::optional<Tensor> scale) {
  const char* op = chain_op_name(kGivens, /*backward=*/false);
  const Operands o = prepare(x, params, kGivens, pairs, layer_offsets, scale, nullptr, op);
  return forward(o, x);
}

// The forward with its segment tops: the CPU kernels do not cut rows into segments, so the tops are (rows, 0).
template <bool kGivens>
std::tuple<Tensor, Tensor> chain_with_tops_cpu(Tensor x, Tensor params, Tensor pairs, Tensor layer_offsets,
                                               std::optional<Tensor> scale) {
  const char* op = chain_op_name(kGivens, /*backward=*/false);
  const Operands o = prepare(x, params, kGivens, pairs, layer_offsets, scale, nullptr, op);
  return {forward(o, x), stable::empty_on(x, {num_rows(stable::sizes_of(x)), 0}, o.acc)};
}

// tops (checked by prepare) are ignored: rows are never segmented here.
template <bool kGivens>
std::tuple<Tensor, Tensor, Tensor> chain_backward_cpu(Tensor grad_out, Tensor x, Tensor params, Tensor pairs,
                                                      Tensor layer_offsets, std::optional<Tensor> scale,
                                                      std::vector<bool> output_mask, std::optional<Tensor> tops) {
  const char* op = chain_op_name(kGivens, /*backward=*/true);
  const Operands o = prepare(x, params, kGivens, pairs, layer_offsets, scale, &grad_out, op, &tops);
  Grads g = backward(o, grad_out, x, output_mask[0], output_mask[1], output_mask[2]);
  return backward_outputs(std::move(g), o, x, params, kGivens, scale);
}

}  // namespace
}  // namespace qgoft

STABLE_TORCH_LIBRARY_IMPL(qgoft, CPU, m) {
  m.impl("givens_chain", TORCH_BOX(&qgoft::chain_cpu<true>));
  m.impl("givens_chain_backward", TORCH_BOX(&qgoft::chain_backward_cpu<true>));
  m.impl("quasi_givens_chain", TORCH_BOX(&qgoft::chain_cpu<false>));
  m.impl("quasi_givens_chain_backward", TORCH_BOX(&qgoft::chain_backward_cpu<false>));
  m.impl("givens_chain_with_tops", TORCH_BOX(&qgoft::chain_with_tops_cpu<true>));
  m.impl("quasi_givens_chain_with_tops", TORCH_BOX(&qgoft::chain_with_tops_cpu<false>));
}
