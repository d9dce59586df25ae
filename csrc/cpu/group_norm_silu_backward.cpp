// CPU GroupNorm(+SiLU) backward: gradients of x, weight and bias.
//
// Pass 1 gives per-(n, channel) sums dsx = sum(dz (x - mean)) and db = sum(dz); pass 2
// writes dx = k1 dz + k2 (x - mean) + k3 (coefficients from csrc/math.h). For NCHW with
// enough slabs both passes run per (n, group) while its slab is in cache; for channels_last,
// per band of whole groups (group_norm_rows.h, band_channels) when bands fit in L2. Pass 1 keeps dz
// for pass 2: in dx itself for fp32/fp64, in an fp32 buffer for bf16/fp16 (per slab for
// NCHW; for channels_last up to kMaxDzBufferBytes, beyond which pass 2 evaluates the SiLU
// derivative again). Every reduction has a fixed order, so results are bitwise reproducible.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "csrc/cpu/group_norm_rows.h"
#include "csrc/group_norm_common.h"

#include <array>
#include <vector>

namespace ldm::cpu {
namespace {

// Values per channels_last tile of pass 1: L2-sized, so the per-tile partial sums (2 C
// values each) stay small beside the tile and their fixed-order reduction is cheap.
constexpr int64_t kTileValues = 1 << 16;
// Largest fp32 dz buffer the bf16/fp16 channels_last backward keeps between its passes. Up to
// here the buffer's extra 4 bytes per value, written and read back, cost less than evaluating
// the SiLU derivative again in pass 2; beyond it the buffer pushes x, dy and dx out of the L3.
// 8 MiB is a quarter of the 32 MB L3 of an AMD Zen 3 / Zen 4 core complex (the fallback of
// l3_cache_bytes): with the op's bf16 x, dy and dx (12 MiB more at that size) it still fits.
constexpr int64_t kMaxDzBufferBytes = int64_t{8} << 20;

template <typename T, typename acc_t>
struct BackwardArgs {
  const T* dy;
  const T* x;
  T* dx;  // nullptr: dx not requested
  const acc_t* mean;
  const acc_t* rstd;
  const acc_t* weight;  // nullptr: ones
  const acc_t* bias;    // nullptr: zeros
  acc_t* dsx;           // [N, C]
  acc_t* db;            // [N, C]
  GroupNormShape s;

  acc_t w(int64_t c) const { return weight ? weight[c] : acc_t(1); }
  acc_t b(int64_t c) const { return bias ? bias[c] : acc_t(0); }

  // k2, k3 of group (n, g) from the pass-1 sums.
  BackwardGroupCoeffs<acc_t> group_coeffs(int64_t n, int64_t g) const {
    const int64_t C = s.C, D = s.channels_per_group();
    acc_t sum_w_db = 0, sum_w_dsx = 0;
    for (int64_t c = g * D; c < (g + 1) * D; ++c) {
      sum_w_db += w(c) * db[n * C + c];
      sum_w_dsx += w(c) * dsx[n * C + c];
    }
    return group_norm_backward_coeffs(rstd[n * s.G + g], sum_w_db, sum_w_dsx,
                                      static_cast<acc_t>(D * s.HW));
  }
};

// NCHW pass 1 for channel (n, c); stores dz to dz_out when given.
template <bool kSilu, typename T, typename acc_t>
void channel_sums(const BackwardArgs<T, acc_t>& a, int64_t n, int64_t c,
                  acc_t* dz_out = nullptr) {
  const int64_t ng = n * a.s.G + c / a.s.channels_per_group();
  const int64_t offset = (n * a.s.C + c) * a.s.HW;
  UniformSum<acc_t> dsx, db;
  backward_sums_run<kSilu>(a.dy + offset, a.x + offset, a.s.HW, Uniform<acc_t>{a.mean[ng]},
                           Uniform<acc_t>{a.rstd[ng] * a.w(c)}, Uniform<acc_t>{a.b(c)}, dsx, db,
                           dz_out);
  a.dsx[n * a.s.C + c] = dsx.total();
  a.db[n * a.s.C + c] = db.total();
}

// NCHW pass 2 for channel (n, c) given its group's coefficients: from dz when pass 1 kept it
// (dz may be the channel's own dx), else evaluating the SiLU derivative again.
template <bool kSilu, typename T, typename acc_t>
void channel_apply(const BackwardArgs<T, acc_t>& a, int64_t n, int64_t c,
                   const BackwardGroupCoeffs<acc_t>& k, const acc_t* dz = nullptr) {
  const int64_t ng = n * a.s.G + c / a.s.channels_per_group();
  const int64_t offset = (n * a.s.C + c) * a.s.HW;
  const Uniform<acc_t> center{a.mean[ng]}, scale{a.rstd[ng] * a.w(c)};
  if (dz) {
    backward_apply_stored_run(dz, a.x + offset, a.dx + offset, a.s.HW, center, scale,
                              Uniform<acc_t>{k.k2}, Uniform<acc_t>{k.k3});
    return;
  }
  backward_apply_run<kSilu>(a.dy + offset, a.x + offset, a.dx + offset, a.s.HW, center, scale,
                            Uniform<acc_t>{a.b(c)}, scale, Uniform<acc_t>{k.k2},
                            Uniform<acc_t>{k.k3});
}

// dx as storage for dz when dx has dz's type (fp32, fp64), else nullptr: pass 1 stores dz there
// and pass 2 turns it into dx in place, so the SiLU derivative is evaluated once and no other
// buffer joins x, dy and dx in the cache. A bf16/fp16 dx could not hold dz exactly.
template <typename T, typename acc_t>
acc_t* dz_storage_in_dx(const BackwardArgs<T, acc_t>& a) {
  if constexpr (std::is_same_v<T, acc_t>) return a.dx;
  return nullptr;
}

template <bool kSilu, typename T, typename acc_t>
void backward_contiguous(const BackwardArgs<T, acc_t>& a) {
  const int64_t N = a.s.N, C = a.s.C, G = a.s.G, D = a.s.channels_per_group(), HW = a.s.HW;
  acc_t* const dz_in_dx = dz_storage_in_dx(a);
  if (a.dx && N * G >= at::get_num_threads()) {
    // Both passes per (n, group) slab while it is in cache; pass 1 keeps dz (in dx, or in a
    // per-thread fp32 buffer) so pass 2 does not evaluate the SiLU derivative again.
    at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buffer(dz_in_dx ? 0 : D * HW);
      for (int64_t ng = begin; ng < end; ++ng) {
        const int64_t n = ng / G, g = ng % G;
        acc_t* const dz = dz_in_dx ? dz_in_dx + ng * D * HW : buffer.data();
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
          channel_sums<kSilu>(a, n, c, dz + (c - g * D) * HW);
        }
        const BackwardGroupCoeffs<acc_t> k = a.group_coeffs(n, g);
        for (int64_t c = g * D; c < (g + 1) * D; ++c) {
          channel_apply<kSilu>(a, n, c, k, dz + (c - g * D) * HW);
        }
      }
    });
    return;
  }
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      channel_sums<kSilu>(a, nc / C, nc % C, dz_in_dx ? dz_in_dx + nc * HW : nullptr);
    }
  });
  if (!a.dx) return;
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / C, c = nc % C;
      channel_apply<kSilu>(a, n, c, a.group_coeffs(n, c / D),
                           dz_in_dx ? dz_in_dx + nc * HW : nullptr);
    }
  });
}

// channels_last bands (group_norm_rows.h, band_channels): both passes per band of whole groups
// of one image while its x, dy and dz stay in L2, as the NCHW slabs do; the sums of pass 1 stay
// in registers down the rows. The size limit is the forward's (kBandBytes there: a quarter of
// a Zen 4 core's 1 MB L2).
constexpr int64_t kBandBytes = int64_t{256} << 10;

template <bool kSilu, typename T, typename acc_t>
void backward_channels_last_bands(const BackwardArgs<T, acc_t>& a, int64_t B) {
  const int64_t C = a.s.C, HW = a.s.HW, G = a.s.G, D = a.s.channels_per_group();
  const int64_t bands = C / B;
  float* const dz_in_dx = dz_storage_in_dx(a);
  at::parallel_for(0, a.s.N * bands, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t kMax = 8 * kLanes;
    float center[kMax], scale[kMax], shift[kMax], k2[kMax], k3[kMax];
    std::vector<float> buffer(dz_in_dx ? 0 : B * HW);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / bands, c0 = (item % bands) * B, offset = n * HW * C + c0;
      for (int64_t k = 0; k < B; ++k) {
        center[k] = a.mean[n * G + (c0 + k) / D];
        scale[k] = a.rstd[n * G + (c0 + k) / D] * a.w(c0 + k);
        shift[k] = a.b(c0 + k);
      }
      float* const dz = dz_in_dx ? dz_in_dx + offset : buffer.data();
      const int64_t dz_stride = dz_in_dx ? C : B;
      with_band_width(B / kLanes, [&](auto width) {
        band_backward_sums<kSilu, decltype(width)::value>(
            a.dy + offset, a.x + offset, HW, C, center, scale, shift, dz, dz_stride,
            a.dsx + n * C + c0, a.db + n * C + c0);
      });
      for (int64_t g = c0 / D; g < (c0 + B) / D; ++g) {
        const BackwardGroupCoeffs<acc_t> k = a.group_coeffs(n, g);
        std::fill(k2 + (g * D - c0), k2 + (g * D - c0) + D, k.k2);
        std::fill(k3 + (g * D - c0), k3 + (g * D - c0) + D, k.k3);
      }
      with_band_width(B / kLanes, [&](auto width) {
        band_backward_apply<decltype(width)::value>(dz, dz_stride, a.x + offset, a.dx + offset,
                                                    HW, C, center, scale, k2, k3);
      });
    }
  });
}

template <bool kSilu, typename T, typename acc_t>
void backward_channels_last(const BackwardArgs<T, acc_t>& a) {
  const int64_t N = a.s.N, C = a.s.C, HW = a.s.HW, G = a.s.G;
  const int64_t D = a.s.channels_per_group();
  if constexpr (std::is_same_v<acc_t, float>) {  // fp64 (gradcheck) has no band path
    if (const int64_t B = band_channels<T>(C, D, HW, kBandBytes); a.dx && B > 0) {
      backward_channels_last_bands<kSilu>(a, B);
      return;
    }
  }
  // Per-(n, channel) parameters as vectors over a row.
  std::vector<acc_t> center(N * C), scale(N * C), shift(N * C);
  for (int64_t ng = 0; ng < N * G; ++ng) {
    const int64_t n = ng / G, c0 = (ng % G) * D;  // the group's first channel
    for (int64_t c = c0; c < c0 + D; ++c) {
      center[n * C + c] = a.mean[ng];
      scale[n * C + c] = a.rstd[ng] * a.w(c);
      shift[n * C + c] = a.b(c);
    }
  }
  const int64_t rows_per_tile = std::max<int64_t>(1, kTileValues / C);
  const int64_t tiles = (HW + rows_per_tile - 1) / rows_per_tile;
  std::vector<acc_t> partial(N * tiles * 2 * C, acc_t(0));  // [N, tiles, {dsx, db}, C]
  // dz kept for pass 2: in dx (fp32/fp64), else in a small fp32 buffer, else recomputed.
  at::Tensor dz_buffer;
  acc_t* dz_store = dz_storage_in_dx(a);
  if (!dz_store && a.dx && N * HW * C * int64_t{sizeof(acc_t)} <= kMaxDzBufferBytes) {
    dz_buffer = at::empty({N * HW * C}, at::dtype<acc_t>());
    dz_store = dz_buffer.mutable_data_ptr<acc_t>();
  }
  at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / tiles, r0 = (item % tiles) * rows_per_tile;
      PerChannelSum<acc_t> dsx{&partial[item * 2 * C]}, db{&partial[item * 2 * C + C]};
      for (int64_t r = r0; r < std::min(HW, r0 + rows_per_tile); ++r) {
        const int64_t offset = (n * HW + r) * C;
        backward_sums_run<kSilu>(a.dy + offset, a.x + offset, C, PerChannel<acc_t>{&center[n * C]},
                                 PerChannel<acc_t>{&scale[n * C]},
                                 PerChannel<acc_t>{&shift[n * C]}, dsx, db,
                                 dz_store ? dz_store + offset : nullptr);
      }
    }
  });
  // Per group, in one parallel region: its channels' sums over the tiles (in tile order), then
  // its pass-2 coefficients as per-channel vectors: one parallel region and no serial step,
  // since each region costs a few microseconds, which counts at the U-Net's 16x16 and 8x8.
  std::vector<acc_t> k2(a.dx ? N * C : 0), k3(a.dx ? N * C : 0);
  at::parallel_for(0, N * G, 8, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / G, g = ng % G, first = n * C + g * D;
      std::fill(a.dsx + first, a.dsx + first + D, acc_t(0));
      std::fill(a.db + first, a.db + first + D, acc_t(0));
      for (int64_t t = 0; t < tiles; ++t) {
        const acc_t* tile = &partial[(n * tiles + t) * 2 * C + g * D];
        for (int64_t j = 0; j < D; ++j) {
          a.dsx[first + j] += tile[j];
          a.db[first + j] += tile[C + j];
        }
      }
      if (!a.dx) continue;
      const BackwardGroupCoeffs<acc_t> k = a.group_coeffs(n, g);
      std::fill(k2.begin() + first, k2.begin() + first + D, k.k2);
      std::fill(k3.begin() + first, k3.begin() + first + D, k.k3);
    }
  });
  if (!a.dx) return;
  at::parallel_for(0, N * HW, std::max<int64_t>(1, 4096 / C), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / HW, offset = row * C;
      if (dz_store) {
        backward_apply_stored_run(dz_store + offset, a.x + offset, a.dx + offset, C,
                                  PerChannel<acc_t>{&center[n * C]}, PerChannel<acc_t>{&scale[n * C]},
                                  PerChannel<acc_t>{&k2[n * C]}, PerChannel<acc_t>{&k3[n * C]});
        continue;
      }
      backward_apply_run<kSilu>(a.dy + offset, a.x + offset, a.dx + offset, C,
                                PerChannel<acc_t>{&center[n * C]}, PerChannel<acc_t>{&scale[n * C]},
                                PerChannel<acc_t>{&shift[n * C]}, PerChannel<acc_t>{&scale[n * C]},
                                PerChannel<acc_t>{&k2[n * C]}, PerChannel<acc_t>{&k3[n * C]});
    }
  });
}

// dweight_c = sum_n rstd dsx, dbias_c = sum_n db (fixed order over n).
template <typename acc_t>
void parameter_grads(const acc_t* dsx, const acc_t* db, const acc_t* rstd,
                     const GroupNormShape& s, acc_t* dweight, acc_t* dbias) {
  const int64_t D = s.channels_per_group();
  for (int64_t g = 0; g < s.G; ++g) {
    for (int64_t c = g * D; c < (g + 1) * D; ++c) {
      acc_t dw = 0, dbc = 0;
      for (int64_t n = 0; n < s.N; ++n) {
        dw += rstd[n * s.G + g] * dsx[n * s.C + c];
        dbc += db[n * s.C + c];
      }
      if (dweight) dweight[c] = dw;
      if (dbias) dbias[c] = dbc;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, int64_t num_groups, bool silu,
    std::array<bool, 3> output_mask) {
  const GroupNormShape s =
      check_group_norm_backward_inputs(grad_y, x, mean, rstd, weight, bias, num_groups);
  const at::ScalarType acc = stats_dtype(x);
  const bool want_dx = output_mask[0];
  const LayoutPlan plan = plan_layout(x, want_dx);
  const at::Tensor xin = plan.input(x), dyin = plan.input(grad_y);
  const at::Tensor w = param_as(weight, acc), b = param_as(bias, acc);
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  at::Tensor dsx = at::empty({s.N, s.C}, x.options().dtype(acc));
  at::Tensor db = at::empty_like(dsx);
  at::Tensor dweight = at::empty({w.defined() && output_mask[1] ? s.C : 0}, dsx.options());
  at::Tensor dbias = at::empty({b.defined() && output_mask[2] ? s.C : 0}, dsx.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "ldm_group_norm_silu_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const BackwardArgs<scalar_t, acc_t> args{
        dyin.const_data_ptr<scalar_t>(), xin.const_data_ptr<scalar_t>(),
        want_dx ? plan.work.mutable_data_ptr<scalar_t>() : nullptr, mean_c.const_data_ptr<acc_t>(),
        rstd_c.const_data_ptr<acc_t>(), w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
        b.defined() ? b.const_data_ptr<acc_t>() : nullptr, dsx.mutable_data_ptr<acc_t>(),
        db.mutable_data_ptr<acc_t>(), s};
    const bool channels_last = plan.channels_last();
    if (silu) {
      channels_last ? backward_channels_last<true>(args) : backward_contiguous<true>(args);
    } else {
      channels_last ? backward_channels_last<false>(args) : backward_contiguous<false>(args);
    }
    parameter_grads(args.dsx, args.db, args.rstd, s,
                    dweight.numel() ? dweight.mutable_data_ptr<acc_t>() : nullptr,
                    dbias.numel() ? dbias.mutable_data_ptr<acc_t>() : nullptr);
  });
  plan.finish();
  return {plan.result, param_grad_as(weight, dweight, x), param_grad_as(bias, dbias, x)};
}

}  // namespace ldm::cpu
