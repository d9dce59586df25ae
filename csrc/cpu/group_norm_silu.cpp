// CPU GroupNorm(+SiLU) forward and backward.
//
// NCHW: one (n, group) slab is contiguous, so a thread computes its statistics and applies
// the normalisation while the slab is still in cache (2 memory passes). When N * groups is
// below the thread count, slabs are split into fixed-size chunks whose partial moments are
// merged in a fixed order; a whole slab merges the same chunks in the same order, so the
// results do not depend on the thread count.
// channels_last: when whole groups make bands of 4-8 vectors whose values over the image fit
// in kBandBytes, each band of one image is a work item, as an NCHW slab is (statistics down its
// rows, then its rows normalised while it is in L2). Otherwise tiles of rows give per-channel
// Welford moments, merged per group and then across tiles in order; then each row is
// normalised with per-channel scale/shift vectors. When the batch divides among the threads,
// each thread does all of this for whole images.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "csrc/cpu/cache_size.h"
#include "csrc/cpu/group_norm_rows.h"
#include "csrc/group_norm_common.h"

#include <c10/util/SmallVector.h>

#include <vector>

namespace ldm::cpu {
namespace {

constexpr int64_t kSplitChunk = 1 << 16;  // values per partial when slabs are split
// Values per channels_last statistics tile: enough rows that the per-tile group bookkeeping
// (O(C)) stays small beside the tile's Welford pass, few enough tiles per image to balance
// the threads.
constexpr int64_t kTileValues = 1 << 16;

// Raw pointers and sizes of one forward call.
template <typename T, typename acc_t>
struct ForwardArgs {
  const T* x;
  T* y;
  const acc_t* weight;  // nullptr: ones
  const acc_t* bias;    // nullptr: zeros
  acc_t* mean;          // [N, G]
  acc_t* rstd;          // [N, G]
  GroupNormShape shape;
  acc_t eps;
  bool stream;  // y goes to memory with non-temporal stores (stream_output)
};

// Whether the forward writes its output with non-temporal stores: fp32 when input and output
// together exceed the L3 (l3_cache_bytes), so the output cannot still be cached for the next
// op and each ordinary store would first read its line from memory (write-allocate). Below
// that size the next op finds the output in the L3, and bf16 is bound by the SiLU's
// arithmetic rather than by memory traffic, so both keep ordinary stores. The streaming store
// itself needs AVX-512F (stream_lanes); other builds store normally.
template <typename T>
bool stream_output(int64_t numel) {
  return std::is_same_v<T, float> && 2 * numel * static_cast<int64_t>(sizeof(T)) > l3_cache_bytes();
}

// Per-channel scale/shift of channel c in group ng so that y = x * scale + shift; with kSilu
// both are multiplied by kNegLog2e, as apply_run takes them.
template <bool kSilu, typename acc_t>
inline void channel_affine(const acc_t* w, const acc_t* b, int64_t c, acc_t mean, acc_t rstd,
                           acc_t& scale, acc_t& shift) {
  const acc_t unit = kSilu ? static_cast<acc_t>(kNegLog2e) : acc_t(1);
  scale = rstd * (w ? w[c] : acc_t(1));
  shift = ((b ? b[c] : acc_t(0)) - mean * scale) * unit;
  scale *= unit;
}

// Largest power-of-two HW whose channels are applied in one run over the slab (PerBlock)
// rather than one run per channel: the U-Net's 16x16 and 8x8 levels have many short channels
// per slab, where a call per channel costs its set-up and tail each time. Beyond 256 the
// per-vector broadcast loads of scale and shift cost more than the calls they save.
constexpr int64_t kMaxHWInOneRun = 256;

// Applies group ng to slab values [begin, end) (which may cross channel boundaries).
template <bool kSilu, typename T, typename acc_t>
void apply_slab_range(const ForwardArgs<T, acc_t>& a, int64_t ng, int64_t begin, int64_t end) {
  const int64_t D = a.shape.channels_per_group(), HW = a.shape.HW;
  const int64_t g = ng % a.shape.G;
  const int64_t base = ng * D * HW;
  if ((HW & (HW - 1)) == 0 && HW >= kLanes && HW <= kMaxHWInOneRun && begin % kLanes == 0) {
    const int64_t first = begin / HW, channels = (end - 1) / HW - first + 1;
    c10::SmallVector<acc_t, 64> scale(channels), shift(channels);
    for (int64_t k = 0; k < channels; ++k) {
      channel_affine<kSilu>(a.weight, a.bias, g * D + first + k, a.mean[ng], a.rstd[ng],
                            scale[k], shift[k]);
    }
    const int log2_hw = __builtin_ctzll(static_cast<unsigned long long>(HW));
    const int64_t offset = begin - first * HW;
    if (HW >= 4 * kLanes && begin % (4 * kLanes) == 0) {  // one load per 4-vector step
      apply_run<kSilu>(a.x + base + begin, a.y + base + begin, end - begin,
                       PerBlock<acc_t, true>{scale.data(), offset, log2_hw},
                       PerBlock<acc_t, true>{shift.data(), offset, log2_hw},
                       a.stream && vector_aligned(a.y + base + begin));
    } else {
      apply_run<kSilu>(a.x + base + begin, a.y + base + begin, end - begin,
                       PerBlock<acc_t>{scale.data(), offset, log2_hw},
                       PerBlock<acc_t>{shift.data(), offset, log2_hw},
                       a.stream && vector_aligned(a.y + base + begin));
    }
    return;
  }
  for (int64_t i = begin; i < end;) {
    const int64_t c = g * D + i / HW;
    const int64_t stop = std::min(end, (i / HW + 1) * HW);
    acc_t scale, shift;
    channel_affine<kSilu>(a.weight, a.bias, c, a.mean[ng], a.rstd[ng], scale, shift);
    apply_run<kSilu>(a.x + base + i, a.y + base + i, stop - i, Uniform<acc_t>{scale},
                     Uniform<acc_t>{shift}, a.stream && vector_aligned(a.y + base + i));
    i = stop;
  }
}

// Moments of n contiguous values as the Chan merge, in order, of their kSplitChunk-value
// chunks: a slab read whole by one thread gets the same bits as its chunks spread over threads
// (below), so the result does not depend on the thread count. One chunk for the U-Net's slabs.
template <typename T, typename acc_t = acc_type<T>>
Moments<acc_t> chunked_moments(const T* x, int64_t n) {
  Moments<acc_t> m{0, 0, 0};
  for (int64_t start = 0; start < n; start += kSplitChunk) {
    m = chan_merge(m, contiguous_moments(x + start, std::min(kSplitChunk, n - start)));
  }
  return m;
}

template <bool kSilu, typename T, typename acc_t>
void forward_contiguous(const ForwardArgs<T, acc_t>& a) {
  const int64_t NG = a.shape.N * a.shape.G;
  const int64_t slab = a.shape.channels_per_group() * a.shape.HW;
  if (NG >= at::get_num_threads()) {
    // Statistics then apply per slab, while the slab is hot in cache.
    at::parallel_for(0, NG, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ng = begin; ng < end; ++ng) {
        const Moments<acc_t> m = chunked_moments(a.x + ng * slab, slab);
        a.mean[ng] = m.mean;
        a.rstd[ng] = rstd_from_moments(m, a.eps);
        apply_slab_range<kSilu>(a, ng, 0, slab);
      }
      if (a.stream) streamed_stores_done();
    });
    return;
  }
  // Few slabs: split each into chunks so every thread has work.
  const int64_t chunks = (slab + kSplitChunk - 1) / kSplitChunk;
  std::vector<Moments<acc_t>> partial(NG * chunks);
  at::parallel_for(0, NG * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t start = (item % chunks) * kSplitChunk;
      partial[item] = contiguous_moments(a.x + (item / chunks) * slab + start,
                                         std::min(kSplitChunk, slab - start));
    }
  });
  for (int64_t ng = 0; ng < NG; ++ng) {
    Moments<acc_t> m{0, 0, 0};
    for (int64_t k = 0; k < chunks; ++k) m = chan_merge(m, partial[ng * chunks + k]);
    a.mean[ng] = m.mean;
    a.rstd[ng] = rstd_from_moments(m, a.eps);
  }
  at::parallel_for(0, NG * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t start = (item % chunks) * kSplitChunk;
      apply_slab_range<kSilu>(a, item / chunks, start, std::min(slab, start + kSplitChunk));
    }
    if (a.stream) streamed_stores_done();
  });
}

// channels_last statistics of tile t of image n (rows_per_tile rows from row t * rows_per_tile):
// per-channel Welford moments (into the C-long scratch mean, m2), merged per group into
// out[0..G).
template <typename T, typename acc_t>
void tile_group_moments(const ForwardArgs<T, acc_t>& a, int64_t n, int64_t t,
                        int64_t rows_per_tile, acc_t* mean, acc_t* m2, Moments<acc_t>* out) {
  const int64_t C = a.shape.C, HW = a.shape.HW, D = a.shape.channels_per_group();
  const int64_t r0 = t * rows_per_tile, rows = std::min(rows_per_tile, HW - r0);
  tile_channel_moments(a.x + (n * HW + r0) * C, rows, C, mean, m2);
  for (int64_t g = 0; g < a.shape.G; ++g) {
    out[g] = merge_channel_moments(mean + g * D, m2 + g * D, D, static_cast<acc_t>(rows));
  }
}

// Image n's group statistics from its tiles' (partial: [tiles, G], merged in tile order) into
// a.mean and a.rstd, and its channels' scale and shift (C each).
template <bool kSilu, typename T, typename acc_t>
void image_affine(const ForwardArgs<T, acc_t>& a, int64_t n, int64_t tiles,
                  const Moments<acc_t>* partial, acc_t* scale, acc_t* shift) {
  const int64_t G = a.shape.G, D = a.shape.channels_per_group();
  for (int64_t g = 0; g < G; ++g) {
    Moments<acc_t> m{0, 0, 0};
    for (int64_t t = 0; t < tiles; ++t) m = chan_merge(m, partial[t * G + g]);
    const int64_t ng = n * G + g;
    a.mean[ng] = m.mean;
    a.rstd[ng] = rstd_from_moments(m, a.eps);
    for (int64_t c = g * D; c < (g + 1) * D; ++c) {
      channel_affine<kSilu>(a.weight, a.bias, c, a.mean[ng], a.rstd[ng], scale[c], shift[c]);
    }
  }
}

// channels_last bands (band_channels): B channels of one image, whole groups and whole vectors,
// whose values over all rows take at most kBandBytes, so that the apply pass reads them from L2
// rather than from the L3 or memory, as the NCHW slabs do (the tiles path reads the image
// twice from beyond L2). 256 KB is a quarter of a Zen 4 core's 1 MB L2 (half of Zen 3's
// 512 KB), leaving room for the output: a band's output goes out in strided pieces of a few
// hundred bytes, which the hardware prefetchers do not fetch ahead, so larger bands lose
// when the output block is not already cached.
constexpr int64_t kBandBytes = int64_t{256} << 10;

template <bool kSilu, typename T, typename acc_t>
void forward_channels_last_bands(const ForwardArgs<T, acc_t>& a, int64_t B) {
  const int64_t C = a.shape.C, HW = a.shape.HW, G = a.shape.G, D = a.shape.channels_per_group();
  const int64_t bands = C / B;
  at::parallel_for(0, a.shape.N * bands, 1, [&](int64_t begin, int64_t end) {
    float mean[8 * kLanes], m2[8 * kLanes], scale[8 * kLanes], shift[8 * kLanes];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / bands, c0 = (item % bands) * B;
      const T* x = a.x + n * HW * C + c0;
      T* y = a.y + n * HW * C + c0;
      with_band_width(B / kLanes, [&](auto width) {
        block_channel_moments<decltype(width)::value>(x, HW, C, mean, m2);
      });
      for (int64_t j = 0; j < B / D; ++j) {
        const int64_t ng = n * G + c0 / D + j;
        const Moments<acc_t> m = merge_channel_moments(mean + j * D, m2 + j * D, D,
                                                       static_cast<acc_t>(HW));
        a.mean[ng] = m.mean;
        a.rstd[ng] = rstd_from_moments(m, a.eps);
        for (int64_t k = j * D; k < (j + 1) * D; ++k) {
          channel_affine<kSilu>(a.weight, a.bias, c0 + k, a.mean[ng], a.rstd[ng], scale[k], shift[k]);
        }
      }
      with_band_width(B / kLanes, [&](auto width) {
        apply_band<kSilu, decltype(width)::value>(x, y, HW, C, scale, shift);
      });
    }
  });
}

template <bool kSilu, typename T, typename acc_t>
void forward_channels_last(const ForwardArgs<T, acc_t>& a) {
  const int64_t N = a.shape.N, C = a.shape.C, HW = a.shape.HW, G = a.shape.G;
  if constexpr (kHasVecPath<T>) {  // fp64 (gradcheck) has no band path
    if (const int64_t B = band_channels<T>(C, a.shape.channels_per_group(), HW, kBandBytes); B > 0) {
      forward_channels_last_bands<kSilu>(a, B);
      return;
    }
  }
  const int64_t rows_per_tile = std::max<int64_t>(1, kTileValues / C);
  const int64_t tiles = (HW + rows_per_tile - 1) / rows_per_tile;
  if (N % at::get_num_threads() == 0) {
    // Whole images per thread: statistics, affine and apply in one parallel region, with no
    // serial step between them (same tiles and merge order as below, so the same bits). Batch
    // 2, the U-Net's guided pair, on two threads takes this path.
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> mean(C), m2(C), scale(C), shift(C);
      std::vector<Moments<acc_t>> partial(tiles * G);
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t t = 0; t < tiles; ++t) {
          tile_group_moments(a, n, t, rows_per_tile, mean.data(), m2.data(), &partial[t * G]);
        }
        image_affine<kSilu>(a, n, tiles, partial.data(), scale.data(), shift.data());
        for (int64_t row = n * HW; row < (n + 1) * HW; ++row) {
          apply_run<kSilu>(a.x + row * C, a.y + row * C, C, PerChannel<acc_t>{scale.data()},
                           PerChannel<acc_t>{shift.data()},
                           a.stream && vector_aligned(a.y + row * C));
        }
      }
      if (a.stream) streamed_stores_done();
    });
    return;
  }
  // Fewer images than threads (or not a multiple): tiles, then rows, spread over the threads.
  std::vector<Moments<acc_t>> partial(N * tiles * G);
  at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mean(C), m2(C);
    for (int64_t item = begin; item < end; ++item) {
      tile_group_moments(a, item / tiles, item % tiles, rows_per_tile, mean.data(), m2.data(),
                         &partial[item * G]);
    }
  });
  std::vector<acc_t> scale(N * C), shift(N * C);
  for (int64_t n = 0; n < N; ++n) {
    image_affine<kSilu>(a, n, tiles, &partial[n * tiles * G], &scale[n * C], &shift[n * C]);
  }
  const int64_t grain = std::max<int64_t>(1, 4096 / C);
  at::parallel_for(0, N * HW, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / HW;
      apply_run<kSilu>(a.x + row * C, a.y + row * C, C, PerChannel<acc_t>{&scale[n * C]},
                       PerChannel<acc_t>{&shift[n * C]}, a.stream && vector_aligned(a.y + row * C));
    }
    if (a.stream) streamed_stores_done();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cpu(
    const at::Tensor& x, int64_t num_groups, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, bool silu) {
  const GroupNormShape shape =
      check_group_norm_inputs(x, num_groups, weight, bias, "ldm::group_norm_silu");
  const at::ScalarType acc = stats_dtype(x);
  const LayoutPlan plan = plan_layout(x, /*want_output=*/true);
  const at::Tensor xin = plan.input(x);
  const at::Tensor w = param_as(weight, acc), b = param_as(bias, acc);
  at::Tensor mean = at::empty({shape.N, shape.G}, x.options().dtype(acc));
  at::Tensor rstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "ldm_group_norm_silu_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const ForwardArgs<scalar_t, acc_t> args{
        xin.const_data_ptr<scalar_t>(), plan.work.mutable_data_ptr<scalar_t>(),
        w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
        b.defined() ? b.const_data_ptr<acc_t>() : nullptr,
        mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), shape,
        static_cast<acc_t>(eps), stream_output<scalar_t>(x.numel())};
    const bool channels_last = plan.channels_last();
    if (silu) {
      channels_last ? forward_channels_last<true>(args) : forward_contiguous<true>(args);
    } else {
      channels_last ? forward_channels_last<false>(args) : forward_contiguous<false>(args);
    }
  });
  plan.finish();
  return {plan.result, mean, rstd};
}

}  // namespace

// Defined in group_norm_silu_backward.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
    const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, int64_t num_groups, bool silu,
    std::array<bool, 3> output_mask);

}  // namespace ldm::cpu

TORCH_LIBRARY_IMPL(ldm, CPU, m) {
  m.impl("group_norm_silu", &ldm::cpu::group_norm_silu_cpu);
  m.impl("group_norm_silu_backward", &ldm::cpu::group_norm_silu_backward_cpu);
}
