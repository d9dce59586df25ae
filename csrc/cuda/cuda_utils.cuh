// Device helpers of the ldm CUDA kernels: aligned vector packs, deterministic block
// reductions (fixed shuffle/shared-memory order, no atomics), sigmoid and launch sizes.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <type_traits>

#include "csrc/math.h"

namespace ldm::cuda {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

// VEC values of T loaded/stored as one 16-byte (or smaller) transaction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Values per 16-byte vector load.
template <typename T>
constexpr int kVec = 16 / sizeof(T) > 8 ? 8 : 16 / sizeof(T);

template <typename T, int VEC>
__host__ __device__ inline bool is_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * VEC) == 0;
}

template <typename acc_t>
__device__ inline acc_t sigmoid(acc_t z) {
  if constexpr (std::is_same_v<acc_t, float>) return 1.0f / (1.0f + __expf(-z));
  else return acc_t(1) / (acc_t(1) + ::exp(-z));
}

// Two sums reduced together (the backward's dsx and db).
template <typename acc_t>
struct Pair {
  acc_t a, b;
};

template <typename acc_t>
__device__ inline Moments<acc_t> shfl_down(const Moments<acc_t>& m, int delta) {
  return Moments<acc_t>{__shfl_down_sync(0xffffffff, m.count, delta),
                        __shfl_down_sync(0xffffffff, m.mean, delta),
                        __shfl_down_sync(0xffffffff, m.m2, delta)};
}

template <typename acc_t>
__device__ inline Pair<acc_t> shfl_down(const Pair<acc_t>& p, int delta) {
  return Pair<acc_t>{__shfl_down_sync(0xffffffff, p.a, delta),
                     __shfl_down_sync(0xffffffff, p.b, delta)};
}

template <typename acc_t>
__device__ inline Moments<acc_t> combine(const Moments<acc_t>& x, const Moments<acc_t>& y) {
  return chan_merge(x, y);
}

template <typename acc_t>
__device__ inline Pair<acc_t> combine(const Pair<acc_t>& x, const Pair<acc_t>& y) {
  return Pair<acc_t>{x.a + y.a, x.b + y.b};
}

template <typename V>
__device__ inline V warp_reduce(V v) {
  for (int delta = kWarp / 2; delta > 0; delta /= 2) v = combine(v, shfl_down(v, delta));
  return v;
}

// Reduces one value per thread of a kThreads block; the result is valid in thread 0.
// `empty` is the identity (zero moments / zero sums).
template <typename V>
__device__ inline V block_reduce(V v, V empty) {
  __shared__ char storage[sizeof(V) * (kThreads / kWarp)];
  V* partial = reinterpret_cast<V*>(storage);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_reduce(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / kWarp ? partial[lane] : empty;
    v = warp_reduce(v);
  }
  __syncthreads();  // storage may be reused by the caller's next reduction
  return v;
}

// Streaming multiprocessors of the current device (ATen's CUDAContext.h needs cuBLAS/cuSPARSE
// headers, which a minimal toolkit lacks; the runtime API does not).
inline int64_t multiprocessors() {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount,
                                        c10::cuda::current_device()));
  return count;
}

// Blocks for a grid-stride elementwise loop over n items.
inline int64_t elementwise_blocks(int64_t n) {
  const int64_t sms = multiprocessors();
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, sms * 8));
}

}  // namespace ldm::cuda
