// CUDA GroupNorm(+SiLU) forward.
//
// 1. Statistics: grid (N*G, splits); each block Welford-accumulates a contiguous share of
//    one group and Chan-merges it across the block; with few groups the group is split over
//    several blocks whose partial moments land in a workspace (no atomics).
// 2. Finalize: one thread per group merges its partials in order -> mean, rstd.
// 3. Apply: elementwise, with 16-byte vector loads when the pointers are aligned.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "csrc/cuda/cuda_utils.cuh"
#include "csrc/group_norm_common.h"

namespace ldm::cuda {
namespace {

// Memory offset of value i (0 <= i < D*HW) of group (n, g).
struct GroupIndexer {
  int64_t C, HW, D;
  bool channels_last;
  __device__ int64_t operator()(int64_t n, int64_t g, int64_t i) const {
    if (!channels_last) return (n * C + g * D) * HW + i;  // the group's slab is contiguous
    return (n * HW + i / D) * C + g * D + i % D;
  }
};

template <typename T, typename acc_t>
__global__ void group_stats_kernel(const T* __restrict__ x, GroupIndexer index, int64_t G,
                                   int64_t per_split, Moments<acc_t>* __restrict__ partial) {
  const int64_t ng = blockIdx.x, split = blockIdx.y;
  const int64_t n = ng / G, g = ng % G;
  const int64_t size = index.D * index.HW;
  const int64_t begin = split * per_split, end = min(size, begin + per_split);
  Moments<acc_t> m{0, 0, 0};
  constexpr int VEC = kVec<T>;
  if (!index.channels_last && end > begin) {
    const T* p = x + index(n, g, begin);
    const int64_t len = end - begin;
    // Scalar head up to 16-byte alignment, vector body, scalar tail.
    int64_t head = 0;
    while (head < len && !is_aligned<T, VEC>(p + head)) ++head;
    const int64_t body = (len - head) / VEC;
    for (int64_t i = threadIdx.x; i < head; i += blockDim.x) m = welford_add(m, acc_t(p[i]));
    const auto* packs = reinterpret_cast<const Pack<T, VEC>*>(p + head);
    for (int64_t i = threadIdx.x; i < body; i += blockDim.x) {
      const Pack<T, VEC> pack = packs[i];
#pragma unroll
      for (int j = 0; j < VEC; ++j) m = welford_add(m, acc_t(pack.v[j]));
    }
    for (int64_t i = head + body * VEC + threadIdx.x; i < len; i += blockDim.x) {
      m = welford_add(m, acc_t(p[i]));
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      m = welford_add(m, acc_t(x[index(n, g, i)]));
    }
  }
  m = block_reduce(m, Moments<acc_t>{0, 0, 0});
  if (threadIdx.x == 0) partial[ng * gridDim.y + split] = m;
}

// Per (n, group): merge the partials in order; then per (n, channel) scale and shift.
template <typename acc_t>
__global__ void finalize_stats_kernel(const Moments<acc_t>* __restrict__ partial, int64_t splits,
                                      int64_t NG, acc_t eps, acc_t* __restrict__ mean,
                                      acc_t* __restrict__ rstd) {
  const int64_t ng = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (ng >= NG) return;
  Moments<acc_t> m{0, 0, 0};
  for (int64_t s = 0; s < splits; ++s) m = chan_merge(m, partial[ng * splits + s]);
  mean[ng] = m.mean;
  rstd[ng] = rstd_from_moments(m, eps);
}

template <typename acc_t>
__global__ void channel_affine_kernel(const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                                      const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                                      int64_t N, int64_t C, int64_t D, acc_t* __restrict__ scale,
                                      acc_t* __restrict__ shift) {
  const int64_t nc = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (nc >= N * C) return;
  const int64_t c = nc % C, ng = (nc / C) * (C / D) + c / D;
  const acc_t s = rstd[ng] * (weight ? weight[c] : acc_t(1));
  scale[nc] = s;
  shift[nc] = (bias ? bias[c] : acc_t(0)) - mean[ng] * s;
}

template <bool kSilu, typename acc_t>
__device__ inline acc_t activate(acc_t z) {
  if constexpr (kSilu) return silu_from_sigmoid(z, sigmoid(z));
  else return z;
}

// y = [silu](x * scale[n, c] + shift[n, c]) for VEC consecutive values per thread when the
// layout keeps them in one channel (NCHW, HW % VEC == 0) or in consecutive channels (NHWC,
// C % VEC == 0) and the pointers are aligned; one value per thread otherwise.
template <bool kSilu, int VEC, typename T, typename acc_t>
__global__ void apply_kernel(const T* __restrict__ x, T* __restrict__ y,
                             const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                             int64_t total, int64_t C, int64_t HW, bool channels_last) {
  const int64_t packs = total / VEC;
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < packs;
       p += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = p * VEC;
    const int64_t nc = channels_last ? (i / (HW * C)) * C + i % C : i / HW;
    const Pack<T, VEC> in = reinterpret_cast<const Pack<T, VEC>*>(x)[p];
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t k = channels_last ? nc + j : nc;
      out.v[j] = T(activate<kSilu>(acc_t(in.v[j]) * scale[k] + shift[k]));
    }
    reinterpret_cast<Pack<T, VEC>*>(y)[p] = out;
  }
}

template <bool kSilu, typename T, typename acc_t>
void launch_apply(const T* x, T* y, const acc_t* scale, const acc_t* shift,
                  const GroupNormShape& s, bool channels_last, cudaStream_t stream) {
  constexpr int VEC = kVec<T>;
  const int64_t total = s.N * s.C * s.HW;
  const bool vector_ok = is_aligned<T, VEC>(x) && is_aligned<T, VEC>(y) &&
                         (channels_last ? s.C % VEC == 0 : s.HW % VEC == 0);
  if (vector_ok) {
    apply_kernel<kSilu, VEC><<<elementwise_blocks(total / VEC), kThreads, 0, stream>>>(
        x, y, scale, shift, total, s.C, s.HW, channels_last);
  } else {
    apply_kernel<kSilu, 1><<<elementwise_blocks(total), kThreads, 0, stream>>>(
        x, y, scale, shift, total, s.C, s.HW, channels_last);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Blocks per group: enough blocks to fill the GPU, each with at least 8 values per thread.
int64_t stats_splits(const GroupNormShape& s) {
  const int64_t sms = multiprocessors();
  const int64_t group_size = s.channels_per_group() * s.HW;
  const int64_t wanted = (4 * sms + s.N * s.G - 1) / (s.N * s.G);
  const int64_t most = std::max<int64_t>(1, group_size / (kThreads * 8));
  return std::max<int64_t>(1, std::min<int64_t>({wanted, most, 65535}));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cuda(
    const at::Tensor& x, int64_t num_groups, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, bool silu) {
  const GroupNormShape s =
      check_group_norm_inputs(x, num_groups, weight, bias, "ldm::group_norm_silu");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType acc = stats_dtype(x);
  const LayoutPlan plan = plan_layout(x, /*want_output=*/true);
  const at::Tensor xin = plan.input(x);
  const bool channels_last = plan.channels_last();
  const at::Tensor w = param_as(weight, acc), b = param_as(bias, acc);
  at::Tensor mean = at::empty({s.N, s.G}, x.options().dtype(acc));
  at::Tensor rstd = at::empty_like(mean);
  at::Tensor scale = at::empty({s.N, s.C}, mean.options()), shift = at::empty_like(scale);
  const int64_t splits = stats_splits(s);
  const int64_t group_size = s.channels_per_group() * s.HW;
  const int64_t per_split = (group_size + splits - 1) / splits;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "ldm_group_norm_silu_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial = at::empty({s.N * s.G * splits * 3}, mean.options());
    auto* partial_ptr = reinterpret_cast<Moments<acc_t>*>(partial.mutable_data_ptr<acc_t>());
    const GroupIndexer index{s.C, s.HW, s.channels_per_group(), channels_last};
    group_stats_kernel<scalar_t, acc_t><<<dim3(s.N * s.G, splits), kThreads, 0, stream>>>(
        xin.const_data_ptr<scalar_t>(), index, s.G, per_split, partial_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t NG = s.N * s.G, NC = s.N * s.C;
    finalize_stats_kernel<acc_t><<<(NG + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        partial_ptr, splits, NG, static_cast<acc_t>(eps), mean.mutable_data_ptr<acc_t>(),
        rstd.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    channel_affine_kernel<acc_t><<<(NC + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(),
        w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
        b.defined() ? b.const_data_ptr<acc_t>() : nullptr, s.N, s.C, s.channels_per_group(),
        scale.mutable_data_ptr<acc_t>(), shift.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    auto apply = silu ? launch_apply<true, scalar_t, acc_t> : launch_apply<false, scalar_t, acc_t>;
    apply(xin.const_data_ptr<scalar_t>(), plan.work.mutable_data_ptr<scalar_t>(),
          scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(), s, channels_last, stream);
  });
  plan.finish();
  return {plan.result, mean, rstd};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, int64_t num_groups, bool silu,
    std::array<bool, 3> output_mask);

}  // namespace ldm::cuda

TORCH_LIBRARY_IMPL(ldm, CUDA, m) {
  m.impl("group_norm_silu", &ldm::cuda::group_norm_silu_cuda);
  m.impl("group_norm_silu_backward", &ldm::cuda::group_norm_silu_backward_cuda);
}
