// Per-element maths of the ldm ops, written once for the CPU and CUDA kernels.
//
// Every function is a template over the value type T so the CPU code can instantiate it
// with at::vec::Vectorized<float> (eight lanes at once) and the CUDA code with float.
// Transcendentals (exp) are computed by the caller, which knows its fastest exp.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace ldm {

// ---- SiLU ------------------------------------------------------------------------------
// silu(z) = z * sigmoid(z); the caller passes sig = 1 / (1 + exp(-z)).
template <typename T>
C10_HOST_DEVICE inline T silu_from_sigmoid(T z, T sig) {
  return z * sig;
}

// silu(z) = z / (1 + exp(-z)); the caller passes e = exp(-z). One division, no sigmoid.
template <typename T>
C10_HOST_DEVICE inline T silu_from_exp_neg(T z, T e, T one) {
  return z / (one + e);
}

// d silu / dz = sig * (1 + z * (1 - sig)).
template <typename T>
C10_HOST_DEVICE inline T silu_grad_from_sigmoid(T z, T sig, T one) {
  return sig * (one + z * (one - sig));
}

// ---- Moments (Welford / Chan) ----------------------------------------------------------
// Count, mean and sum of squared deviations (M2) of a set of values. Merging partial
// moments with Chan et al.'s formula avoids the E[x^2] - E[x]^2 cancellation.
template <typename acc_t>
struct Moments {
  acc_t count;
  acc_t mean;
  acc_t m2;
};

// Welford's one-value update (the CUDA kernels use it per element).
template <typename acc_t>
C10_HOST_DEVICE inline Moments<acc_t> welford_add(Moments<acc_t> m, acc_t value) {
  m.count += acc_t(1);
  const acc_t delta = value - m.mean;
  m.mean += delta / m.count;
  m.m2 += delta * (value - m.mean);
  return m;
}

// Chan et al. (1979) pairwise merge of two partial moments; order-fixed callers stay deterministic.
template <typename acc_t>
C10_HOST_DEVICE inline Moments<acc_t> chan_merge(Moments<acc_t> a, Moments<acc_t> b) {
  const acc_t count = a.count + b.count;
  if (count == acc_t(0)) {
    return a;
  }
  const acc_t delta = b.mean - a.mean;
  const acc_t b_frac = b.count / count;
  Moments<acc_t> out;
  out.count = count;
  out.mean = a.mean + delta * b_frac;
  out.m2 = a.m2 + b.m2 + delta * delta * a.count * b_frac;
  return out;
}

// ---- GroupNorm backward coefficients ---------------------------------------------------
// With xhat = (x - mean) rstd, z = xhat w + b, dz = dL/dz and per-channel sums
// dsx_c = sum(dz (x - mean)), db_c = sum(dz):
//   dx = rstd (w_c dz - mean_g(w dz) - xhat mean_g(w dz xhat))
//      = k1_c dz + k2 (x - mean) + k3,   k1_c = rstd w_c.
// sum_w_db = sum_c w_c db_c and sum_w_dsx = sum_c w_c dsx_c over the group's channels.
template <typename acc_t>
struct BackwardGroupCoeffs {
  acc_t k2;
  acc_t k3;
};

template <typename acc_t>
C10_HOST_DEVICE inline BackwardGroupCoeffs<acc_t> group_norm_backward_coeffs(
    acc_t rstd, acc_t sum_w_db, acc_t sum_w_dsx, acc_t group_size) {
  const acc_t a = sum_w_db / group_size;          // mean_g(w dz)
  const acc_t b = rstd * sum_w_dsx / group_size;  // mean_g(w dz xhat)
  BackwardGroupCoeffs<acc_t> k;
  k.k2 = -rstd * rstd * b;
  k.k3 = -rstd * a;
  return k;
}

// 1 / sqrt(var + eps) with the biased variance M2 / count (eps inside the rsqrt).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t rstd_from_moments(const Moments<acc_t>& m, acc_t eps) {
  using std::sqrt;
  const acc_t var = m.m2 / m.count;
  return acc_t(1) / sqrt(var > acc_t(0) ? var + eps : eps);
}

// ---- Sampler step ----------------------------------------------------------------------
// Indices into the coefficient vector (mirrors ldm/kernels/sampler_step.py).
enum SamplerCoeff : int {
  kGuidance = 0, kA, kS, kCx, kCx0, kCeps, kCnoise, kCprev, kLogvarMin, kLogvarMax, kNumCoeffs
};
enum PredictionType : int { kPredEps = 0, kPredV = 1, kPredX0 = 2 };

// Classifier-free guidance: u + g (c - u).
template <typename T>
C10_HOST_DEVICE inline T guide(T uncond, T cond, T scale) {
  return uncond + scale * (cond - uncond);
}

// Step coefficients after per-call preprocessing (reciprocals and the v normalisation).
template <typename T>
struct StepCoeffs {
  T a, s, inv_a, inv_s;       // x = a x0 + s eps
  T v_alpha, v_sigma, inv_r;  // v: alpha = a/r, sigma = s/r, r = sqrt(a^2 + s^2)
  T c_x, c_x0, c_eps, c_prev, c_noise;
};

// Preprocess the raw float coefficient vector once per call (or per CUDA thread).
C10_HOST_DEVICE inline StepCoeffs<float> step_coeffs_from(const float* c) {
  StepCoeffs<float> k;
  k.a = c[kA];
  k.s = c[kS];
  k.inv_a = 1.0f / k.a;
  k.inv_s = 1.0f / k.s;
  const float r = std::sqrt(k.a * k.a + k.s * k.s);
  k.inv_r = 1.0f / r;
  k.v_alpha = k.a / r;
  k.v_sigma = k.s / r;
  k.c_x = c[kCx];
  k.c_x0 = c[kCx0];
  k.c_eps = c[kCeps];
  k.c_prev = c[kCprev];
  k.c_noise = c[kCnoise];
  return k;
}

// (x0, eps) from the model output under one parameterisation.
template <int kPred, typename T>
C10_HOST_DEVICE inline void x0_eps_from_output(T x, T out, const StepCoeffs<T>& k, T& x0, T& eps) {
  if (kPred == kPredEps) {
    eps = out;
    x0 = (x - k.s * eps) * k.inv_a;
  } else if (kPred == kPredX0) {
    x0 = out;
    eps = (x - k.a * x0) * k.inv_s;
  } else {  // v-prediction (Salimans & Ho 2022): x0 = alpha xn - sigma v, eps = sigma xn + alpha v
    const T xn = x * k.inv_r;
    x0 = k.v_alpha * xn - k.v_sigma * out;
    eps = k.v_sigma * xn + k.v_alpha * out;
  }
}

// The deterministic part of x_next; the caller adds c_prev * prev and std * noise.
template <typename T>
C10_HOST_DEVICE inline T step_mean(T x, T x0, T eps, const StepCoeffs<T>& k) {
  return k.c_x * x + k.c_x0 * x0 + k.c_eps * eps;
}

// Improved-DDPM eq. 15 log-variance interpolation exponent: 0.5 (f lv_max + (1 - f) lv_min),
// f = (v + 1) / 2; the caller takes exp of it for the noise std multiplier.
template <typename T>
C10_HOST_DEVICE inline T learned_log_std(T var_out, T logvar_min, T logvar_max, T half, T one) {
  const T frac = (var_out + one) * half;
  return half * (frac * logvar_max + (one - frac) * logvar_min);
}

}  // namespace ldm
