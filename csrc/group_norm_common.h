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

// How one call lays out its output and inputs. The output keeps x's memory format
// (empty_like); when that is neither layout the kernel writes a contiguous stand-in that
// finish() copies back.
struct LayoutPlan {
  at::Tensor result;  // returned to the caller ([0] when the output is not wanted)
  at::Tensor work;    // written by the kernel
  Layout layout = Layout::kContiguous;
  bool copy_back = false;  // result has unusual strides: work is a contiguous stand-in

  bool channels_last() const { return layout == Layout::kChannelsLast; }
  // An input in the kernel's layout (a copy only when its strides differ).
  at::Tensor input(const at::Tensor& t) const {
    if (!channels_last()) return t.contiguous();
    return with_layout_of(t, work);
  }
  void finish() const {
    if (copy_back) result.copy_(work);
  }
};

inline LayoutPlan plan_layout(const at::Tensor& x, bool want_output) {
  LayoutPlan plan;
  const at::Tensor like = want_output ? at::empty_like(x) : x;
  const c10::optional<Layout> layout = layout_of(like);
  plan.layout = layout.value_or(Layout::kContiguous);
  plan.result = want_output ? like : at::empty({0}, x.options());
  plan.copy_back = want_output && !layout;
  if (layout) plan.work = like;
  else if (want_output) plan.work = at::empty_like(x, at::MemoryFormat::Contiguous);
  return plan;
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

// Validates the backward's arguments beyond the forward's and returns the shape.
inline GroupNormShape check_group_norm_backward_inputs(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    int64_t num_groups) {
  const char* op = "ldm::group_norm_silu_backward";
  const GroupNormShape shape = check_group_norm_inputs(x, num_groups, weight, bias, op);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type() &&
              grad_y.device() == x.device(), op, ": grad_y must match x in shape, dtype and "
              "device, got ", grad_y.sizes(), " ", grad_y.scalar_type(), " vs ", x.sizes(), " ",
              x.scalar_type());
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&mean, &rstd}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef({shape.N, shape.G}) && t->scalar_type() == acc &&
                t->device() == x.device(), op, ": mean/rstd must be [N, num_groups] ", acc,
                " tensors from the forward, got ", t->sizes(), " ", t->scalar_type());
  }
  return shape;
}

// Parameter gradient g in the parameter's dtype, or [0] when it was not computed.
inline at::Tensor param_grad_as(const c10::optional<at::Tensor>& param, const at::Tensor& g,
                                const at::Tensor& x) {
  return g.numel() ? g.to(param.value().scalar_type()) : at::empty({0}, x.options());
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
