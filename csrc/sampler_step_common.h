// Input checks of the sampler-step op, shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "csrc/math.h"

namespace ldm {

// Sizes of one sampler step: B latents of `per_sample` values; the model output holds
// `out_rows` (B or 2B) rows of `out_per_sample` (C or 2C channels) values.
struct SamplerStepShape {
  int64_t batch, per_sample, out_per_sample;
  bool guided;
};

// Validates the op's arguments and returns its sizes.
inline SamplerStepShape check_sampler_step_inputs(const at::Tensor& x, const at::Tensor& out,
                                                  const at::Tensor& coeffs,
                                                  const c10::optional<at::Tensor>& noise,
                                                  const c10::optional<at::Tensor>& prev,
                                                  int64_t prediction_type, bool learned_variance) {
  const char* op = "ldm::sampler_step";
  TORCH_CHECK(x.dim() >= 2 && x.numel() > 0, op, ": x must be a non-empty (B, C, ...) tensor, "
              "got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating, got ",
              x.scalar_type());
  TORCH_CHECK(prediction_type >= kPredEps && prediction_type <= kPredX0, op,
              ": prediction_type must be 0 (eps), 1 (v) or 2 (x0), got ", prediction_type);
  const int64_t B = x.size(0), C = x.size(1);
  const int64_t out_channels = learned_variance ? 2 * C : C;
  bool shape_ok = out.dim() == x.dim() && (out.size(0) == B || out.size(0) == 2 * B) &&
                  out.size(1) == out_channels;
  for (int64_t d = 2; shape_ok && d < x.dim(); ++d) shape_ok = out.size(d) == x.size(d);
  TORCH_CHECK(shape_ok, op, ": model_output must be [", B, " or ", 2 * B, ", ", out_channels,
              ", ...] matching x ", x.sizes(), learned_variance ? " (learned variance: 2C channels)"
              : "", ", got ", out.sizes());
  TORCH_CHECK(out.device() == x.device() && at::isFloatingType(out.scalar_type()), op,
              ": model_output must be a floating tensor on x's device (", x.device(), ")");
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.size(0) == kNumCoeffs &&
              coeffs.scalar_type() == at::kFloat && coeffs.device() == x.device(), op,
              ": coeffs must be a float32 [", int(kNumCoeffs), "] tensor on x's device, got ",
              coeffs.sizes(), " ", coeffs.scalar_type(), " on ", coeffs.device());
  for (const auto* t : {&noise, &prev}) {
    if (!t->has_value() || !(*t)->defined()) continue;
    TORCH_CHECK((*t)->sizes() == x.sizes() && (*t)->device() == x.device() &&
                at::isFloatingType((*t)->scalar_type()), op, ": ", t == &noise ? "noise" : "prev",
                " must be a floating tensor shaped like x ", x.sizes(), " on x's device, got ",
                (*t)->sizes(), " on ", (*t)->device());
  }
  const int64_t per_sample = x.numel() / B;
  return SamplerStepShape{B, per_sample, per_sample / C * out_channels, out.size(0) == 2 * B};
}

// t contiguous in x's dtype (a no-op for the usual inputs); undefined when absent.
inline at::Tensor contiguous_as(const c10::optional<at::Tensor>& t, const at::Tensor& x) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->to(x.scalar_type()).contiguous();
}

// Raw pointers of one call, as the kernels read them.
template <typename T>
struct StepArgs {
  const T* x;
  const T* out;    // [B or 2B, C or 2C, ...]
  const T* noise;  // nullptr: no noise
  const T* prev;   // nullptr: no prev term
  T* x_next;
  T* x0;
  const float* coeffs;
  SamplerStepShape shape;
  bool learned_variance;
};

// Checked, contiguous inputs and freshly allocated outputs of one call.
struct SamplerStepTensors {
  at::Tensor x, out, noise, prev, coeffs, x_next, x0;
  SamplerStepShape shape;
  bool learned_variance;

  template <typename T>
  StepArgs<T> args() const {
    return StepArgs<T>{x.const_data_ptr<T>(), out.const_data_ptr<T>(),
                       noise.defined() ? noise.const_data_ptr<T>() : nullptr,
                       prev.defined() ? prev.const_data_ptr<T>() : nullptr,
                       x_next.mutable_data_ptr<T>(), x0.mutable_data_ptr<T>(),
                       coeffs.const_data_ptr<float>(), shape, learned_variance};
  }
};

inline SamplerStepTensors prepare_sampler_step(const at::Tensor& x, const at::Tensor& model_output,
                                               const at::Tensor& coeffs,
                                               const c10::optional<at::Tensor>& noise,
                                               const c10::optional<at::Tensor>& prev,
                                               int64_t prediction_type, bool learned_variance) {
  SamplerStepTensors t;
  t.shape = check_sampler_step_inputs(x, model_output, coeffs, noise, prev, prediction_type,
                                      learned_variance);
  t.x = x.contiguous();
  t.out = contiguous_as(model_output, x);
  t.noise = contiguous_as(noise, x);
  t.prev = contiguous_as(prev, x);
  t.coeffs = coeffs.contiguous();
  t.x_next = at::empty_like(t.x);
  t.x0 = at::empty_like(t.x);
  t.learned_variance = learned_variance;
  return t;
}

}  // namespace ldm
