// CUDA sampler step: guidance, parameterisation and update in one elementwise kernel.
// The coefficients are read from device memory, so the launch needs no host values of them
// (a sampling loop can be captured in a CUDA graph).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "csrc/cuda/cuda_utils.cuh"
#include "csrc/sampler_step_common.h"

namespace ldm::cuda {
namespace {

template <int kPred, bool kGuided, typename T>
__global__ void sampler_step_kernel(StepArgs<T> a) {
  const float* c = a.coeffs;
  const StepCoeffs<float> k = step_coeffs_from(c);
  const int64_t P = a.shape.per_sample, PO = a.shape.out_per_sample, B = a.shape.batch;
  const int64_t total = B * P;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / P, i = idx % P;
    const T* uncond = a.out + b * PO + i;
    const T* cond = kGuided ? a.out + (B + b) * PO + i : uncond;
    const float x = float(a.x[idx]);
    float out = float(*uncond);
    if constexpr (kGuided) out = guide(out, float(*cond), c[kGuidance]);
    float x0, eps;
    x0_eps_from_output<kPred>(x, out, k, x0, eps);
    float next = step_mean(x, x0, eps, k);
    if (a.prev) next += k.c_prev * float(a.prev[idx]);
    if (a.noise) {
      float std = k.c_noise;
      if (a.learned_variance) {  // variance channels follow the C mean channels (cond half)
        std *= __expf(learned_log_std(float(cond[P]), c[kLogvarMin], c[kLogvarMax], 0.5f, 1.0f));
      }
      next += std * float(a.noise[idx]);
    }
    a.x_next[idx] = T(next);
    a.x0[idx] = T(x0);
  }
}

template <int kPred, typename T>
void launch(const StepArgs<T>& a, cudaStream_t stream) {
  const int64_t blocks = elementwise_blocks(a.shape.batch * a.shape.per_sample);
  if (a.shape.guided) sampler_step_kernel<kPred, true><<<blocks, kThreads, 0, stream>>>(a);
  else sampler_step_kernel<kPred, false><<<blocks, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> sampler_step_cuda(const at::Tensor& x,
                                                     const at::Tensor& model_output,
                                                     const at::Tensor& coeffs,
                                                     const c10::optional<at::Tensor>& noise,
                                                     const c10::optional<at::Tensor>& prev,
                                                     int64_t prediction_type,
                                                     bool learned_variance) {
  const SamplerStepTensors t = prepare_sampler_step(x, model_output, coeffs, noise, prev,
                                                      prediction_type, learned_variance);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "ldm_sampler_step_cuda", [&] {
    const StepArgs<scalar_t> args = t.args<scalar_t>();
    switch (prediction_type) {
      case kPredEps: launch<kPredEps>(args, stream); break;
      case kPredV: launch<kPredV>(args, stream); break;
      default: launch<kPredX0>(args, stream); break;
    }
  });
  return {t.x_next, t.x0};
}

}  // namespace
}  // namespace ldm::cuda

TORCH_LIBRARY_IMPL(ldm, CUDA, m) {
  m.impl("sampler_step", &ldm::cuda::sampler_step_cuda);
}
