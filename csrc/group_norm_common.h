// Input checks and memory-layout handling shared by the CPU and CUDA GroupNorm(+SiLU) ops.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace ldm {

// The two layouts the kernels walk; anything else is copied into kContiguous first.
enum class Layout { kContiguous, kChannelsLast };

struct GroupNormShape {
  int64_t N, C, HW, G;
  int64_t channels_per_group() const { return C / G; }
};

// True when t is dense with channels innermost: (N, *spatial, C) in memory.
inline bool is_channels_last_dense(const at::Tensor& t) {
  std::vector<int64_t> order{0};
  for (int64_t d = 2; d < t.dim(); ++d) order.push_back(d);
  order.push_back(1);
  return t.permute(order).is_contiguous();
}

// The layout of a dense tensor, or nullopt when it is neither of the two.
inline c10::optional<Layout> layout_of(const at::Tensor& t) {
  if (t.is_contiguous()) return Layout::kContiguous;
  if (is_channels_last_dense(t)) return Layout::kChannelsLast;
  return c10::nullopt;
}

// x with the strides of `like` (same sizes); copies only when they differ.
inline at::Tensor with_layout_of(const at::Tensor& x, const at::Tensor& like) {
  if (x.strides() == like.strides()) return x;
  return at::empty_like(like, x.options()).copy_(x);
}

// Validates x / weight / bias of a GroupNorm call and returns its shape.
inline GroupNormShape check_group_norm_inputs(const at::Tensor& x, int64_t num_groups,
                                              const c10::optional<at::Tensor>& weight,
                                              const c10::optional<at::Tensor>& bias,
                                              const char* op) {
  TORCH_CHECK(x.dim() >= 3 && x.dim() <= 5, op, ": x must be (N, C, *spatial) with 1 to 3 "
              "spatial dims, got shape ", x.sizes());
  TORCH_CHECK(x.numel() > 0, op, ": x must not be empty, got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating tensor, got ",
              x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK(num_groups > 0 && C % num_groups == 0, op, ": channels (", C,
              ") must be divisible by num_groups (", num_groups, ")");
  for (const auto* p : {&weight, &bias}) {
    if (!p->has_value() || !(*p)->defined()) continue;
    const at::Tensor& t = **p;
    const char* name = p == &weight ? "weight" : "bias";
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", name, " must have shape [", C,
                "], got ", t.sizes());
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
                x.device());
    TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat, op, ": ",
                name, " dtype ", t.scalar_type(), " must be x's dtype (", x.scalar_type(),
                ") or float32");
  }
  return GroupNormShape{x.size(0), C, x.numel() / (x.size(0) * C), num_groups};
}

// weight/bias as a contiguous accumulation-type tensor, or an undefined tensor when absent.
inline at::Tensor param_as(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->to(acc).contiguous();
}

// Accumulation dtype of the statistics: fp64 for fp64 inputs, else fp32.
inline at::ScalarType stats_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace ldm
