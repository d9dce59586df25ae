// CUDA GroupNorm(+SiLU) backward, deterministic (no atomics):
// 1. per-(n, channel) partial sums dsx = sum(dz (x - mean)), db = sum(dz) over splits of
//    the spatial extent (NCHW: block per channel row; NHWC: 32 channels x 8 rows per block),
// 2. in-order merge of the splits, 3. per-group coefficients k2, k3 (csrc/math.h),
// 4. dweight/dbias per channel (fixed loop over n), 5. elementwise dx.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <array>

#include "csrc/cuda/cuda_utils.cuh"
#include "csrc/group_norm_common.h"

namespace ldm::cuda {
namespace {

// Per-element parameters of the backward, read from per-(n, group) statistics.
template <typename acc_t>
struct BackwardParams {
  const acc_t* mean;    // [N, G]
  const acc_t* rstd;    // [N, G]
  const acc_t* weight;  // [C] or nullptr
  const acc_t* bias;    // [C] or nullptr
  int64_t C, G, D, HW;
  __device__ acc_t w(int64_t c) const { return weight ? weight[c] : acc_t(1); }
  __device__ acc_t b(int64_t c) const { return bias ? bias[c] : acc_t(0); }
};

// dz = dy * silu'(z) (or dy) with z = (x - mean) * rstd * w + b.
template <bool kSilu, typename acc_t>
__device__ inline acc_t upstream_grad(acc_t dy, acc_t xc, acc_t scale, acc_t shift) {
  if constexpr (!kSilu) return dy;
  const acc_t z = xc * scale + shift;
  return dy * silu_grad_from_sigmoid(z, sigmoid(z), acc_t(1));
}

// NCHW: block (nc, split) sums its share of channel row nc.
template <bool kSilu, typename T, typename acc_t>
__global__ void channel_sums_nchw_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                         BackwardParams<acc_t> p, int64_t per_split,
                                         Pair<acc_t>* __restrict__ partial) {
  const int64_t nc = blockIdx.x, split = blockIdx.y;
  const int64_t c = nc % p.C, ng = (nc / p.C) * p.G + c / p.D;
  const acc_t center = p.mean[ng], scale = p.rstd[ng] * p.w(c), shift = p.b(c);
  const int64_t begin = split * per_split, end = min(p.HW, begin + per_split);
  Pair<acc_t> sums{0, 0};
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t o = nc * p.HW + i;
    const acc_t xc = acc_t(x[o]) - center;
    const acc_t dz = upstream_grad<kSilu>(acc_t(dy[o]), xc, scale, shift);
    sums.a += dz * xc;
    sums.b += dz;
  }
  sums = block_reduce(sums, Pair<acc_t>{0, 0});
  if (threadIdx.x == 0) partial[nc * gridDim.y + split] = sums;
}

// NHWC: block (channel tile, n, split); thread (tx, ty) walks rows ty, ty+8, ... of its
// split for channel tile*32 + tx (coalesced along C); rows are summed in shared memory.
template <bool kSilu, typename T, typename acc_t>
__global__ void channel_sums_nhwc_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                         BackwardParams<acc_t> p, int64_t per_split,
                                         Pair<acc_t>* __restrict__ partial) {
  __shared__ Pair<acc_t> rows[8][32];
  const int64_t c = blockIdx.x * 32 + threadIdx.x, n = blockIdx.y, split = blockIdx.z;
  Pair<acc_t> sums{0, 0};
  if (c < p.C) {
    const int64_t ng = n * p.G + c / p.D;
    const acc_t center = p.mean[ng], scale = p.rstd[ng] * p.w(c), shift = p.b(c);
    const int64_t begin = split * per_split, end = min(p.HW, begin + per_split);
    for (int64_t r = begin + threadIdx.y; r < end; r += blockDim.y) {
      const int64_t o = (n * p.HW + r) * p.C + c;
      const acc_t xc = acc_t(x[o]) - center;
      const acc_t dz = upstream_grad<kSilu>(acc_t(dy[o]), xc, scale, shift);
      sums.a += dz * xc;
      sums.b += dz;
    }
  }
  rows[threadIdx.y][threadIdx.x] = sums;
  __syncthreads();
  if (threadIdx.y == 0 && c < p.C) {
    for (int r = 1; r < 8; ++r) sums = combine(sums, rows[r][threadIdx.x]);
    partial[(n * p.C + c) * gridDim.z + split] = sums;
  }
}

// Per (n, c): merge splits in order -> dsx, db.
template <typename acc_t>
__global__ void merge_sums_kernel(const Pair<acc_t>* __restrict__ partial, int64_t splits,
                                  int64_t NC, acc_t* __restrict__ dsx, acc_t* __restrict__ db) {
  const int64_t nc = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (nc >= NC) return;
  Pair<acc_t> s{0, 0};
  for (int64_t k = 0; k < splits; ++k) s = combine(s, partial[nc * splits + k]);
  dsx[nc] = s.a;
  db[nc] = s.b;
}

// Per (n, g): k2, k3 of dx = k1 dz + k2 (x - mean) + k3.
template <typename acc_t>
__global__ void group_coeffs_kernel(const acc_t* __restrict__ dsx, const acc_t* __restrict__ db,
                                    BackwardParams<acc_t> p, int64_t NG,
                                    BackwardGroupCoeffs<acc_t>* __restrict__ k) {
  const int64_t ng = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (ng >= NG) return;
  const int64_t n = ng / p.G, g = ng % p.G;
  acc_t sum_w_db = 0, sum_w_dsx = 0;
  for (int64_t c = g * p.D; c < (g + 1) * p.D; ++c) {
    sum_w_db += p.w(c) * db[n * p.C + c];
    sum_w_dsx += p.w(c) * dsx[n * p.C + c];
  }
  k[ng] = group_norm_backward_coeffs(p.rstd[ng], sum_w_db, sum_w_dsx, acc_t(p.D * p.HW));
}

// Per channel: dweight = sum_n rstd dsx, dbias = sum_n db (fixed order).
template <typename acc_t>
__global__ void param_grads_kernel(const acc_t* __restrict__ dsx, const acc_t* __restrict__ db,
                                   BackwardParams<acc_t> p, int64_t N, acc_t* __restrict__ dweight,
                                   acc_t* __restrict__ dbias) {
  const int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (c >= p.C) return;
  acc_t dw = 0, dbc = 0;
  for (int64_t n = 0; n < N; ++n) {
    dw += p.rstd[n * p.G + c / p.D] * dsx[n * p.C + c];
    dbc += db[n * p.C + c];
  }
  if (dweight) dweight[c] = dw;
  if (dbias) dbias[c] = dbc;
}

template <bool kSilu, typename T, typename acc_t>
__global__ void dx_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                          BackwardParams<acc_t> p, const BackwardGroupCoeffs<acc_t>* __restrict__ k,
                          int64_t total, bool channels_last) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = channels_last ? i % p.C : (i / p.HW) % p.C;
    const int64_t n = i / (p.C * p.HW), ng = n * p.G + c / p.D;
    const acc_t scale = p.rstd[ng] * p.w(c);
    const acc_t xc = acc_t(x[i]) - p.mean[ng];
    const acc_t dz = upstream_grad<kSilu>(acc_t(dy[i]), xc, scale, p.b(c));
    dx[i] = T(scale * dz + k[ng].k2 * xc + k[ng].k3);
  }
}

// Splits of the spatial extent so that about 4 blocks per SM are busy.
int64_t spatial_splits(int64_t rows_of_blocks, int64_t HW) {
  const int64_t sms = multiprocessors();
  const int64_t wanted = (4 * sms + rows_of_blocks - 1) / rows_of_blocks;
  const int64_t most = std::max<int64_t>(1, HW / (kThreads * 4));
  return std::max<int64_t>(1, std::min<int64_t>({wanted, most, 65535}));
}

template <bool kSilu, typename T, typename acc_t>
void backward(const T* dy, const T* x, T* dx, const BackwardParams<acc_t>& p, int64_t N,
              bool channels_last, acc_t* dsx, acc_t* db, acc_t* dweight, acc_t* dbias,
              const at::TensorOptions& acc_options, cudaStream_t stream) {
  const int64_t NC = N * p.C, NG = N * p.G;
  const int64_t splits = spatial_splits(channels_last ? N * ((p.C + 31) / 32) : NC, p.HW);
  const int64_t per_split = (p.HW + splits - 1) / splits;
  at::Tensor partial = at::empty({NC * splits * 2}, acc_options);
  auto* partial_ptr = reinterpret_cast<Pair<acc_t>*>(partial.mutable_data_ptr<acc_t>());
  if (channels_last) {
    channel_sums_nhwc_kernel<kSilu, T, acc_t>
        <<<dim3((p.C + 31) / 32, N, splits), dim3(32, 8), 0, stream>>>(dy, x, p, per_split,
                                                                       partial_ptr);
  } else {
    channel_sums_nchw_kernel<kSilu, T, acc_t>
        <<<dim3(NC, splits), kThreads, 0, stream>>>(dy, x, p, per_split, partial_ptr);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  merge_sums_kernel<acc_t><<<(NC + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      partial_ptr, splits, NC, dsx, db);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (dweight || dbias) {
    param_grads_kernel<acc_t><<<(p.C + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        dsx, db, p, N, dweight, dbias);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!dx) return;
  at::Tensor coeffs = at::empty({NG * 2}, acc_options);
  auto* k = reinterpret_cast<BackwardGroupCoeffs<acc_t>*>(coeffs.mutable_data_ptr<acc_t>());
  group_coeffs_kernel<acc_t><<<(NG + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      dsx, db, p, NG, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t total = NC * p.HW;
  dx_kernel<kSilu, T, acc_t><<<elementwise_blocks(total), kThreads, 0, stream>>>(
      dy, x, dx, p, k, total, channels_last);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, int64_t num_groups, bool silu,
    std::array<bool, 3> output_mask) {
  const GroupNormShape s =
      check_group_norm_backward_inputs(grad_y, x, mean, rstd, weight, bias, num_groups);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType acc = stats_dtype(x);
  const bool want_dx = output_mask[0];
  const LayoutPlan plan = plan_layout(x, want_dx);
  const at::Tensor xin = plan.input(x), dyin = plan.input(grad_y);
  const at::Tensor w = param_as(weight, acc), b = param_as(bias, acc);
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  at::Tensor dsx = at::empty({s.N, s.C}, x.options().dtype(acc)), db = at::empty_like(dsx);
  at::Tensor dweight = at::empty({w.defined() && output_mask[1] ? s.C : 0}, dsx.options());
  at::Tensor dbias = at::empty({b.defined() && output_mask[2] ? s.C : 0}, dsx.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "ldm_group_norm_silu_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardParams<acc_t> p{mean_c.const_data_ptr<acc_t>(), rstd_c.const_data_ptr<acc_t>(),
                                  w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
                                  b.defined() ? b.const_data_ptr<acc_t>() : nullptr,
                                  s.C, s.G, s.channels_per_group(), s.HW};
    auto run = silu ? backward<true, scalar_t, acc_t> : backward<false, scalar_t, acc_t>;
    run(dyin.const_data_ptr<scalar_t>(), xin.const_data_ptr<scalar_t>(),
        want_dx ? plan.work.mutable_data_ptr<scalar_t>() : nullptr, p, s.N,
        plan.channels_last(), dsx.mutable_data_ptr<acc_t>(),
        db.mutable_data_ptr<acc_t>(),
        dweight.numel() ? dweight.mutable_data_ptr<acc_t>() : nullptr,
        dbias.numel() ? dbias.mutable_data_ptr<acc_t>() : nullptr, dsx.options(), stream);
  });
  plan.finish();
  return {plan.result, param_grad_as(weight, dweight, x), param_grad_as(bias, dbias, x)};
}

}  // namespace ldm::cuda
