// CPU sampler step: guidance, parameterisation and update in one pass over the latents.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "csrc/cpu/vec_helpers.h"
#include "csrc/math.h"
#include "csrc/sampler_step_common.h"

namespace ldm::cpu {
namespace {

constexpr int64_t kGrain = 1 << 15;  // values per parallel task (small latents run on one thread)

// Broadcast scalar step coefficients into vector lanes.
inline StepCoeffs<Vec> broadcast(const StepCoeffs<float>& k) {
  return StepCoeffs<Vec>{Vec(k.a),       Vec(k.s),     Vec(k.inv_a), Vec(k.inv_s),
                         Vec(k.v_alpha), Vec(k.v_sigma), Vec(k.inv_r), Vec(k.c_x),
                         Vec(k.c_x0),    Vec(k.c_eps), Vec(k.c_prev), Vec(k.c_noise)};
}

// Value j of a run: loads from a T pointer as V (fp32 lanes or one float).
template <typename V, typename T>
inline V load(const T* p) {
  if constexpr (std::is_same_v<V, Vec>) return load_lanes(p);
  else return static_cast<float>(*p);
}

template <typename V, typename T>
inline void store(T* p, const V& v) {
  if constexpr (std::is_same_v<V, Vec>) store_lanes(p, v);
  else *p = static_cast<T>(v);
}

template <typename V>
inline V exp_of(const V& v) {
  if constexpr (std::is_same_v<V, Vec>) return v.exp_u20();
  else return std::exp(v);
}

// One value (V = float) or kLanes values (V = Vec) of the step.
template <int kPred, bool kGuided, typename V, typename T>
inline void step_values(const StepArgs<T>& a, const StepCoeffs<V>& k, const V& guidance,
                        const V& logvar_min, const V& logvar_max, const T* x, const T* uncond,
                        const T* cond, const T* noise, const T* prev, T* x_next, T* x0) {
  const V xv = load<V>(x);
  V out = load<V>(uncond);
  if constexpr (kGuided) out = guide(out, load<V>(cond), guidance);
  V x0v, eps;
  x0_eps_from_output<kPred>(xv, out, k, x0v, eps);
  V next = step_mean(xv, x0v, eps, k);
  if (prev) next = next + k.c_prev * load<V>(prev);
  if (noise) {
    V std = k.c_noise;
    if (a.learned_variance) {
      // The variance channels follow the C mean channels; with guidance they come from cond.
      const T* var = (kGuided ? cond : uncond) + a.shape.per_sample;
      std = std * exp_of(learned_log_std(load<V>(var), logvar_min, logvar_max, V(0.5f), V(1.0f)));
    }
    next = next + std * load<V>(noise);
  }
  store(x_next, next);
  store(x0, x0v);
}

template <int kPred, bool kGuided, typename T>
void step_range(const StepArgs<T>& a, int64_t begin, int64_t end) {
  const StepCoeffs<float> k = step_coeffs_from(a.coeffs);
  const StepCoeffs<Vec> kv = broadcast(k);
  const float* c = a.coeffs;
  const int64_t P = a.shape.per_sample, PO = a.shape.out_per_sample, B = a.shape.batch;
  for (int64_t idx = begin; idx < end;) {
    const int64_t b = idx / P, i0 = idx % P, stop = std::min(end - idx, P - i0) + i0;
    const T* uncond = a.out + b * PO;
    const T* cond = kGuided ? a.out + (B + b) * PO : nullptr;
    int64_t i = i0;
    auto row_ptr = [&](const T* p) { return p ? p + b * P + i : nullptr; };
    if constexpr (kHasVecPath<T>) {
      for (; i + kLanes <= stop; i += kLanes) {
        step_values<kPred, kGuided, Vec>(a, kv, Vec(c[kGuidance]), Vec(c[kLogvarMin]),
                                         Vec(c[kLogvarMax]), row_ptr(a.x), uncond + i,
                                         kGuided ? cond + i : nullptr, row_ptr(a.noise), row_ptr(a.prev),
                                         a.x_next + b * P + i, a.x0 + b * P + i);
      }
    }
    for (; i < stop; ++i) {
      step_values<kPred, kGuided, float>(a, k, c[kGuidance], c[kLogvarMin], c[kLogvarMax],
                                         row_ptr(a.x), uncond + i, kGuided ? cond + i : nullptr,
                                         row_ptr(a.noise), row_ptr(a.prev), a.x_next + b * P + i,
                                         a.x0 + b * P + i);
    }
    idx += stop - i0;
  }
}

template <int kPred, typename T>
void run_step(const StepArgs<T>& a) {
  at::parallel_for(0, a.shape.batch * a.shape.per_sample, kGrain, [&](int64_t begin, int64_t end) {
    a.shape.guided ? step_range<kPred, true>(a, begin, end) : step_range<kPred, false>(a, begin, end);
  });
}

std::tuple<at::Tensor, at::Tensor> sampler_step_cpu(const at::Tensor& x,
                                                    const at::Tensor& model_output,
                                                    const at::Tensor& coeffs,
                                                    const c10::optional<at::Tensor>& noise,
                                                    const c10::optional<at::Tensor>& prev,
                                                    int64_t prediction_type,
                                                    bool learned_variance) {
  const SamplerStepTensors t = prepare_sampler_step(x, model_output, coeffs, noise, prev,
                                                      prediction_type, learned_variance);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "ldm_sampler_step_cpu", [&] {
    const StepArgs<scalar_t> args = t.args<scalar_t>();
    switch (prediction_type) {
      case kPredEps: run_step<kPredEps>(args); break;
      case kPredV: run_step<kPredV>(args); break;
      default: run_step<kPredX0>(args); break;
    }
  });
  return {t.x_next, t.x0};
}

}  // namespace
}  // namespace ldm::cpu

TORCH_LIBRARY_IMPL(ldm, CPU, m) {
  m.impl("sampler_step", &ldm::cpu::sampler_step_cpu);
}
