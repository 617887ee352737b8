// ATen glue of the CPU backend: argument checks (common/checks.h, shared with the CUDA glue), dtype
// dispatch, threading and the deterministic reduction of the parameter gradients. The kernels
// (chain_kernel_*.cpp) see raw pointers only.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "chain_kernel.h"
#include "common/checks.h"

namespace qgoft {
namespace {

using at::Tensor;

// Deterministic chunking of the rows for the parameter-gradient reduction: it depends only on the
// problem size and the kernel's tile height, never on the number of threads.
constexpr int64_t kMinTilesPerChunk = 8;
constexpr int64_t kMaxChunks = 64;
// Rough amount of elements a forward task should touch before it is worth a thread.
constexpr int64_t kForwardGrainElements = 1 << 15;

// Everything a kernel call needs, validated.
struct Operands {
  Tensor x2;      // (rows, d)
  Tensor pairs;   // (P, 2) int32 contiguous
  Tensor blocks;  // (P, 4) accumulation type
  Tensor scale;   // (d,) accumulation type, or undefined
  at::ScalarType acc = at::kFloat;
  cpu::ChainParams params;
  int64_t rows() const { return x2.size(0); }
};

Tensor rotation_blocks(const Tensor& angles, at::ScalarType acc);

// Checks every argument (common/checks.h) and the layout values, and builds the kernel parameters.
// params: the angles (P,) (givens) or the quasi-Givens blocks (P, 2, 2); grad_out: backward only.
Operands prepare(const Tensor& x, const Tensor& params, bool givens, const Tensor& pairs,
                 const Tensor& offsets, const std::optional<Tensor>& scale, const Tensor* grad_out,
                 const char* op) {
  Operands o;
  o.params.dtype = check_chain_args(x, params, givens, pairs, offsets, scale, grad_out, op);
  const int64_t d = x.size(-1);
  o.acc = accumulation_type(o.params.dtype);
  o.pairs = pairs.contiguous();
  const Tensor oc = offsets.contiguous();
  check_layout_values(o.pairs.const_data_ptr<int32_t>(), o.pairs.size(0), oc.const_data_ptr<int32_t>(),
                      oc.numel() - 1, d, op);
  o.x2 = rows_view(x, d);
  o.blocks = givens ? rotation_blocks(params, o.acc)
                    : params.reshape({params.size(0), 4}).to(o.acc).contiguous();
  if (scale.has_value()) o.scale = scale->to(o.acc).contiguous();
  o.params.d = d;
  o.params.num_pairs = o.pairs.size(0);
  o.params.pairs = o.pairs.const_data_ptr<int32_t>();
  o.params.blocks = o.blocks.const_data_ptr();
  o.params.scale = o.scale.defined() ? o.scale.const_data_ptr() : nullptr;
  return o;
}

Tensor forward(const Operands& o, const Tensor& x) {
  const int64_t rows = o.rows(), d = o.params.d;
  Tensor y = at::empty({rows, d}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (rows > 0 && d > 0) {
    const int64_t tile = cpu::tile_rows(o.params.dtype, d);
    const int64_t tiles = (rows + tile - 1) / tile;
    const int64_t grain = std::max<int64_t>(1, kForwardGrainElements / (tile * d));
    const void* xp = o.x2.const_data_ptr();
    void* yp = y.mutable_data_ptr();
    const int64_t ld = o.x2.stride(0);
    at::parallel_for(0, tiles, grain, [&](int64_t b, int64_t e) {
      cpu::chain_forward(o.params, xp, ld, yp, b * tile, std::min(e * tile, rows));
    });
  }
  return y.view(x.sizes());
}

// Returns (grad_x, grad_blocks (P, 4) acc, grad_scale (d,) acc); undefined where not requested.
std::tuple<Tensor, Tensor, Tensor> backward(const Operands& o, const Tensor& grad_out,
                                            const Tensor& x, bool want_x, bool want_blocks,
                                            bool want_scale) {
  const int64_t rows = o.rows(), d = o.params.d, num_pairs = o.params.num_pairs;
  want_scale = want_scale && o.scale.defined();
  const Tensor g2 = rows_view(grad_out.scalar_type() == x.scalar_type()
                                  ? grad_out : grad_out.to(x.scalar_type()), d);
  const int64_t g_ld = g2.stride(0);
  Tensor grad_x;
  if (want_x) grad_x = at::empty({rows, d}, x.options().memory_format(at::MemoryFormat::Contiguous));
  void* gxp = want_x ? grad_x.mutable_data_ptr() : nullptr;
  const int64_t tile = cpu::tile_rows(o.params.dtype, d);
  const int64_t tiles = (rows + tile - 1) / tile;

  Tensor grad_blocks, grad_scale;
  if (!want_blocks && !want_scale) {
    if (want_x && rows > 0 && d > 0) {  // adjoint only: x is not read
      const int64_t grain = std::max<int64_t>(1, kForwardGrainElements / (tile * d));
      at::parallel_for(0, tiles, grain, [&](int64_t b, int64_t e) {
        cpu::chain_backward(o.params, g2.const_data_ptr(), g_ld, nullptr, 0, gxp, b * tile,
                            std::min(e * tile, rows), nullptr, nullptr);
      });
    }
  } else {
    // Fixed chunks of rows, each reduced by the kernel into its own partial sums, then summed in
    // chunk order: bitwise reproducible for any thread count.
    const int64_t tiles_per_chunk =
        std::max(kMinTilesPerChunk, (tiles + kMaxChunks - 1) / kMaxChunks);
    const int64_t chunks = std::max<int64_t>(1, (tiles + tiles_per_chunk - 1) / tiles_per_chunk);
    const int64_t width = 4 * num_pairs + d;
    Tensor partial = at::zeros({chunks, width}, x.options().dtype(o.acc));
    const Tensor x2 = o.x2;
    const int64_t x_ld = x2.stride(0);
    if (rows > 0 && d > 0) {
      at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
        for (int64_t c = b; c < e; ++c) {
          const int64_t r0 = c * tiles_per_chunk * tile;
          const int64_t r1 = std::min(rows, r0 + tiles_per_chunk * tile);
          char* base = static_cast<char*>(partial.mutable_data_ptr()) +
                       c * width * partial.element_size();
          void* pb = want_blocks ? base : nullptr;
          void* ps = want_scale ? base + 4 * num_pairs * partial.element_size() : nullptr;
          cpu::chain_backward(o.params, g2.const_data_ptr(), g_ld, x2.const_data_ptr(), x_ld,
                              gxp, r0, r1, pb, ps);
        }
      });
    }
    Tensor total = at::empty({width}, partial.options());
    AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "qgoft_reduce_chunks", [&] {
      const scalar_t* src = partial.const_data_ptr<scalar_t>();
      scalar_t* dst = total.mutable_data_ptr<scalar_t>();
      // Threads only pay off for large reductions (each task: >= ~256K additions).
      const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / chunks);
      at::parallel_for(0, width, grain, [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) {
          scalar_t s = src[k];
          for (int64_t c = 1; c < chunks; ++c) s += src[c * width + k];
          dst[k] = s;
        }
      });
    });
    // Separate tensors: the op's schema promises outputs that alias nothing.
    if (want_blocks) grad_blocks = total.narrow(0, 0, 4 * num_pairs).view({num_pairs, 4}).clone();
    if (want_scale) grad_scale = total.narrow(0, 4 * num_pairs, d).clone();
  }
  if (want_x) grad_x = grad_x.view(x.sizes());
  return {grad_x, grad_blocks, grad_scale};
}

Tensor empty_like_flat(const Tensor& t) { return at::empty({0}, t.options()); }

// ------------------------------------------------------------------------------------------------
// Strict Givens rotations: blocks [[c, -s], [s, c]] from the angles.
// ------------------------------------------------------------------------------------------------
// Blocks (c, -s, s, c) of the angles, in the accumulation type. A plain loop on purpose: P is small and
// torch's vectorised cos/sin open a parallel region, whose wake-up costs more than the work.
Tensor rotation_blocks(const Tensor& angles, at::ScalarType acc) {
  const Tensor a = angles.to(acc).contiguous();
  Tensor blocks = at::empty({a.size(0), 4}, a.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "qgoft_rotation_blocks", [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    scalar_t* bp = blocks.mutable_data_ptr<scalar_t>();
    for (int64_t p = 0; p < a.size(0); ++p) {
      const scalar_t c = std::cos(ap[p]), s = std::sin(ap[p]);
      bp[4 * p] = c;
      bp[4 * p + 1] = -s;
      bp[4 * p + 2] = s;
      bp[4 * p + 3] = c;
    }
  });
  return blocks;
}

// d/dtheta of the block entries (c, -s, s, c) is (-s, -c, c, -s): chain rule on the block gradients.
Tensor angle_grads(const Tensor& blocks, const Tensor& grad_blocks) {
  Tensor out = at::empty({blocks.size(0)}, blocks.options());
  AT_DISPATCH_FLOATING_TYPES(blocks.scalar_type(), "qgoft_angle_grads", [&] {
    const scalar_t* b = blocks.const_data_ptr<scalar_t>();
    const scalar_t* g = grad_blocks.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int64_t p = 0; p < blocks.size(0); ++p) {
      const scalar_t c = b[4 * p], s = b[4 * p + 2];
      o[p] = -s * g[4 * p] - c * g[4 * p + 1] + c * g[4 * p + 2] - s * g[4 * p + 3];
    }
  });
  return out;
}

Tensor givens_chain_cpu(const Tensor& x, const Tensor& angles, const Tensor& pairs,
                        const Tensor& layer_offsets, const std::optional<Tensor>& scale) {
  const Operands o = prepare(x, angles, /*givens=*/true, pairs, layer_offsets, scale, nullptr,
                             "qgoft::givens_chain");
  return forward(o, x);
}

std::tuple<Tensor, Tensor, Tensor> givens_chain_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& angles, const Tensor& pairs,
    const Tensor& layer_offsets, const std::optional<Tensor>& scale,
    std::array<bool, 3> output_mask) {
  const Operands o = prepare(x, angles, /*givens=*/true, pairs, layer_offsets, scale, &grad_out,
                             "qgoft::givens_chain_backward");
  auto [gx, gb, gs] = backward(o, grad_out, x, output_mask[0], output_mask[1], output_mask[2]);
  Tensor g_angles;
  if (gb.defined()) g_angles = angle_grads(o.blocks, gb).to(angles.scalar_type());
  return {gx.defined() ? gx : empty_like_flat(x),
          g_angles.defined() ? g_angles : empty_like_flat(angles),
          gs.defined() ? gs.to(scale->scalar_type()) : empty_like_flat(angles)};
}

// ------------------------------------------------------------------------------------------------
// Quasi-Givens blocks (P, 2, 2).
// ------------------------------------------------------------------------------------------------
Tensor quasi_givens_chain_cpu(const Tensor& x, const Tensor& blocks, const Tensor& pairs,
                              const Tensor& layer_offsets, const std::optional<Tensor>& scale) {
  const Operands o = prepare(x, blocks, /*givens=*/false, pairs, layer_offsets, scale, nullptr,
                             "qgoft::quasi_givens_chain");
  return forward(o, x);
}

std::tuple<Tensor, Tensor, Tensor> quasi_givens_chain_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& blocks, const Tensor& pairs,
    const Tensor& layer_offsets, const std::optional<Tensor>& scale,
    std::array<bool, 3> output_mask) {
  const Operands o = prepare(x, blocks, /*givens=*/false, pairs, layer_offsets, scale, &grad_out,
                             "qgoft::quasi_givens_chain_backward");
  auto [gx, gb, gs] = backward(o, grad_out, x, output_mask[0], output_mask[1], output_mask[2]);
  return {gx.defined() ? gx : empty_like_flat(x),
          gb.defined() ? gb.view(blocks.sizes()).to(blocks.scalar_type()) : empty_like_flat(blocks),
          gs.defined() ? gs.to(scale->scalar_type()) : empty_like_flat(blocks)};
}

}  // namespace
}  // namespace qgoft

TORCH_LIBRARY_IMPL(qgoft, CPU, m) {
  m.impl("givens_chain", &qgoft::givens_chain_cpu);
  m.impl("givens_chain_backward", &qgoft::givens_chain_backward_cpu);
  m.impl("quasi_givens_chain", &qgoft::quasi_givens_chain_cpu);
  m.impl("quasi_givens_chain_backward", &qgoft::quasi_givens_chain_backward_cpu);
}
