// CPU flash attention for bf16: softmax(q k^T * scale) v on AVX-512 bf16 dot products, without
// materialising the N x M scores.
//
// Why: on a CPU with avx512_bf16 but no AMX (AMD Zen 4), PyTorch's CPU flash SDPA runs bf16
// no faster than fp32 (about 130 GFLOP/s on two Zen 4 cores at 4096 tokens, while a large
// bf16 GEMM reaches about 370), and at 64x64 latents attention is about 40% of the SD U-Net's
// bf16 time (docs/kernels.md).
//
// Algorithm: FlashAttention's online softmax (Dao et al. 2022, Algorithm 1). A task owns
// kBlockQ query rows of one (batch, head) and walks the keys in blocks of kBlockK, keeping per
// row the running max m, the running sum l and the unnormalised output O, all fp32:
//   S = q k^T * scale * log2(e);   m' = max(m, rowmax S);   P = 2^(S - m')
//   l = l 2^(m - m') + rowsum P;   O = O 2^(m - m') + bf16(P) v
// and finally writes O / l. P is rounded to bf16 for the second product, as the reduced
// precision paths of PyTorch's SDPA and of FlashAttention do.
//
// vdpbf16ps multiplies adjacent bf16 pairs into fp32 lanes (acc += a0 b0 + a1 b1), so each
// product's reduction dimension is packed in pairs: K per chunk of 64 keys as
// [pair of d][64 keys][2], V as [pair of keys][d][2]. Rows of q and of P already hold pairs
// along their reduction dimension and are read as 32-bit broadcasts.
//
// Registered only in AVX-512 builds (AVX-512F/BW on the build host; vdpbf16ps itself needs
// avx512_bf16 and is emulated by shifts and two FMAs without it): elsewhere
// ldm.kernels.attention uses PyTorch's SDPA.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "csrc/cpu/attention_common.h"
#include "csrc/cpu/vec_helpers.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace ldm::cpu {
namespace {

// kRows x kChunk scores are 16 zmm accumulators, half of AVX-512's 32 vector registers, which
// leaves the other half for the broadcast q pairs and the packed K vectors.
constexpr int64_t kRows = 4;        // query rows per micro-kernel (register block)
constexpr int64_t kChunk = 64;      // keys per score micro-kernel: 4 vectors of 16 lanes
constexpr int64_t kBlockQ = 64;     // query rows per task
// kBlockK keys of packed K and V (2 x 32 KB in bf16 at d = 64) stay in the core's L2 (1 MB on
// Zen 4) while a task's kBlockQ rows walk them.
constexpr int64_t kBlockK = 256;    // keys per online-softmax step (multiple of kChunk)

using Pair = uint32_t;  // two bf16 values, the first in the low half

inline Pair pair_of(uint16_t lo, uint16_t hi) { return Pair(lo) | (Pair(hi) << 16); }

// acc + a.lo * b.lo + a.hi * b.hi per fp32 lane, a and b holding bf16 pairs.
inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
#if defined(__AVX512BF16__)  // avx512_bf16: one vdpbf16ps
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
#else  // bf16 -> fp32 is a 16-bit shift; two FMAs
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)),
                        _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), acc);
  return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, high)),
                         _mm512_castsi512_ps(_mm512_and_si512(b, high)), acc);
#endif
}

struct Shape {
  int64_t batch, heads, n, m, d;
  int64_t d_pairs() const { return (d + 1) / 2; }
  int64_t d_lanes() const { return round_up(d, kLanes); }  // O row length (whole vectors)
  int64_t m_chunks() const { return round_up(m, kChunk); }
};

// K of one head as [m_chunks / 64][d_pairs][64] pairs, zero past m and d.
void pack_keys(const Rows& k, const Shape& s, Pair* out) {
  const int64_t dp = s.d_pairs();
  for (int64_t c = 0; c < s.m_chunks() / kChunk; ++c) {
    for (int64_t p = 0; p < dp; ++p) {
      Pair* dst = out + (c * dp + p) * kChunk;
      for (int64_t j = 0; j < kChunk; ++j) {
        const int64_t key = c * kChunk + j;
        dst[j] = key >= s.m ? 0
                            : pair_of(k.at(key, 2 * p), 2 * p + 1 < s.d ? k.at(key, 2 * p + 1) : 0);
      }
    }
  }
}

// V of one head as [m_chunks / 2][d_lanes] pairs of consecutive keys, zero past m and d.
void pack_values(const Rows& v, const Shape& s, Pair* out) {
  const int64_t dl = s.d_lanes();
  for (int64_t jp = 0; jp < s.m_chunks() / 2; ++jp) {
    const int64_t j0 = 2 * jp, j1 = 2 * jp + 1;
    for (int64_t e = 0; e < dl; ++e) {
      const uint16_t lo = (e < s.d && j0 < s.m) ? v.at(j0, e) : 0;
      const uint16_t hi = (e < s.d && j1 < s.m) ? v.at(j1, e) : 0;
      out[jp * dl + e] = pair_of(lo, hi);
    }
  }
}

// f.operator()<K>() for K = min(4, n) vectors: the micro-kernels' register-block widths.
template <typename F>
void with_vectors(int64_t n, F&& f) {
  switch (std::min<int64_t>(4, n)) {
    case 1: f.template operator()<1>(); break;
    case 2: f.template operator()<2>(); break;
    case 3: f.template operator()<3>(); break;
    default: f.template operator()<4>(); break;
  }
}

// S[r][0:16 kVecs] = mul * q_r . k_j for kRows query rows and the first 16 kVecs keys of a
// chunk; row_max[r] = max(row_max[r], max over the first `valid` of those keys).
template <int kVecs>
void score_kernel(const Pair* q, int64_t dp, const Pair* k, float* s, int64_t s_stride,
                  float mul, int64_t valid, float* row_max) {
  __m512 acc[kRows][kVecs];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t p = 0; p < dp; ++p) {
    __m512i b[kVecs];
    for (int v = 0; v < kVecs; ++v) b[v] = _mm512_loadu_si512(k + p * kChunk + v * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(q[r * dp + p]));
      for (int v = 0; v < kVecs; ++v) acc[r][v] = dot_pairs(acc[r][v], a, b[v]);
    }
  }
  const __m512 scale = _mm512_set1_ps(mul);
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int r = 0; r < kRows; ++r) {
    __m512 vmax = lowest;
    for (int v = 0; v < kVecs; ++v) {
      const __m512 scaled = _mm512_mul_ps(acc[r][v], scale);
      _mm512_storeu_ps(s + r * s_stride + v * kLanes, scaled);
      // Padded keys score 0 and must not raise the max (all-negative rows would underflow).
      vmax = _mm512_mask_max_ps(vmax, first_lanes(valid - v * kLanes), vmax, scaled);
    }
    row_max[r] = std::max(row_max[r], _mm512_reduce_max_ps(vmax));
  }
}

// Scores of kRows rows against keys [0, count) of a block (chunks of 64, the last one cut
// to whole vectors); block_max[r] receives each row's maximum.
void score_block(const Pair* q, int64_t dp, const Pair* k, float* s, int64_t count, float mul,
                 float* block_max) {
  std::fill(block_max, block_max + kRows, -std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < count; c += kChunk) {
    const int64_t valid = std::min(kChunk, count - c);
    const Pair* kc = k + c * dp;
    float* sc = s + c;
    with_vectors((valid + kLanes - 1) / kLanes, [&]<int K>() {
      score_kernel<K>(q, dp, kc, sc, kBlockK, mul, valid, block_max);
    });
  }
}

// O[r][0:16 kVecs] = corr[r] O[r] + P[r] . V for kRows rows over `pairs` key pairs.
template <int kVecs>
void output_kernel(const Pair* p, int64_t p_stride, const Pair* v, int64_t v_stride,
                   int64_t pairs, const float* corr, float* o, int64_t o_stride) {
  __m512 acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    const __m512 c = _mm512_set1_ps(corr[r]);
    for (int e = 0; e < kVecs; ++e)
      acc[r][e] = _mm512_mul_ps(_mm512_loadu_ps(o + r * o_stride + e * kLanes), c);
  }
  for (int64_t jp = 0; jp < pairs; ++jp) {
    __m512i b[kVecs];
    for (int e = 0; e < kVecs; ++e) b[e] = _mm512_loadu_si512(v + jp * v_stride + e * kLanes);
    for (int r = 0; r < kRows; ++r) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(p[r * p_stride + jp]));
      for (int e = 0; e < kVecs; ++e) acc[r][e] = dot_pairs(acc[r][e], a, b[e]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int e = 0; e < kVecs; ++e) _mm512_storeu_ps(o + r * o_stride + e * kLanes, acc[r][e]);
}

void output_update(const Pair* p, int64_t p_stride, const Pair* v, const Shape& s, int64_t pairs,
                   const float* corr, float* o) {
  const int64_t dl = s.d_lanes();
  for (int64_t e0 = 0; e0 < dl; e0 += 4 * kLanes) {
    const Pair* ve = v + e0;
    float* oe = o + e0;
    with_vectors((dl - e0) / kLanes, [&]<int K>() {
      output_kernel<K>(p, p_stride, ve, dl, pairs, corr, oe, dl);
    });
  }
}

// Online-softmax step for one row: S[0:count] (already times log2 e, maximum block_max) ->
// P (bf16, zero up to the next 16), updates the running max and sum, returns the rescale
// factor of the old O.
float softmax_step(const float* s, int64_t count, float block_max, float& max, float& sum,
                   uint16_t* p) {
  const float new_max = std::max(max, block_max);
  const float corr = std::exp2(max - new_max);  // 0 on the first block (max = -inf)
  const __m512 shift = _mm512_set1_ps(new_max);
  __m512 vsum = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + kLanes <= count; j += kLanes) {
    const __m512 e = exp2_poly_narrow(_mm512_sub_ps(_mm512_loadu_ps(s + j), shift));
    vsum = _mm512_add_ps(vsum, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), to_bf16_lanes(e));
  }
  if (j < count) {
    const __m512 e = _mm512_maskz_mov_ps(
        first_lanes(count - j),
        exp2_poly_narrow(_mm512_sub_ps(_mm512_loadu_ps(s + j), shift)));
    vsum = _mm512_add_ps(vsum, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), to_bf16_lanes(e));
  }
  max = new_max;
  sum = sum * corr + _mm512_reduce_add_ps(vsum);
  return corr;
}

// Per-thread buffers of one task.
struct Scratch {
  std::vector<Pair> q;      // [kBlockQ][d_pairs]
  std::vector<float> s;     // [kBlockQ][kBlockK]
  std::vector<uint16_t> p;  // [kBlockQ][kBlockK]
  std::vector<float> o;     // [kBlockQ][d_lanes]
  std::vector<float> max, sum, corr, block_max;
  explicit Scratch(const Shape& sh)
      : q(kBlockQ * sh.d_pairs()), s(kBlockQ * kBlockK), p(kBlockQ * kBlockK),
        o(kBlockQ * sh.d_lanes()), max(kBlockQ), sum(kBlockQ), corr(kBlockQ),
        block_max(kBlockQ) {}
};

// Rows [q0, q0 + rows) of one head: out rows (stride out_stride) = attention of q over K, V.
void attend_block(const Rows& q, int64_t q0, int64_t rows, const Pair* kp, const Pair* vp,
                  const Shape& sh, float mul, uint16_t* out, int64_t out_stride, Scratch& w) {
  const int64_t dp = sh.d_pairs(), dl = sh.d_lanes(), padded = round_up(rows, kRows);
  for (int64_t r = 0; r < padded; ++r) {  // zero rows past the end give finite unused scores
    Pair* dst = w.q.data() + r * dp;
    if (r < rows && sh.d % 2 == 0) {  // a row of q already is d/2 pairs
      std::memcpy(dst, q.data + (q0 + r) * q.row_stride, sh.d * sizeof(uint16_t));
      continue;
    }
    for (int64_t p = 0; p < dp; ++p)
      dst[p] = r >= rows ? 0
                         : pair_of(q.at(q0 + r, 2 * p), 2 * p + 1 < sh.d ? q.at(q0 + r, 2 * p + 1) : 0);
  }
  std::fill(w.o.begin(), w.o.end(), 0.0f);
  std::fill(w.max.begin(), w.max.end(), -std::numeric_limits<float>::infinity());
  std::fill(w.sum.begin(), w.sum.end(), 0.0f);
  const Pair* p_pairs = reinterpret_cast<const Pair*>(w.p.data());
  for (int64_t k0 = 0; k0 < sh.m; k0 += kBlockK) {
    const int64_t count = std::min(kBlockK, sh.m - k0);
    for (int64_t r = 0; r < padded; r += kRows)
      score_block(w.q.data() + r * dp, dp, kp + k0 * dp, w.s.data() + r * kBlockK, count, mul,
                  w.block_max.data() + r);
    for (int64_t r = 0; r < padded; ++r)
      w.corr[r] = softmax_step(w.s.data() + r * kBlockK, count, w.block_max[r], w.max[r],
                               w.sum[r], w.p.data() + r * kBlockK);
    for (int64_t r = 0; r < padded; r += kRows)
      output_update(p_pairs + r * (kBlockK / 2), kBlockK / 2, vp + (k0 / 2) * dl, sh,
                    (count + 1) / 2, w.corr.data() + r, w.o.data() + r * dl);
  }
  for (int64_t r = 0; r < rows; ++r)
    store_normalised_row(&w.o[r * dl], 1.0f / w.sum[r], sh.d, out + (q0 + r) * out_stride);
}

at::Tensor flash_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                               const at::Tensor& v_in, double scale) {
  check_attention_inputs("flash_attention", q_in, k_in, v_in);
  // Rows may have any stride; elements within a row must be adjacent.
  auto rows_contiguous = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const Shape sh{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  // Output memory is [B, N, H, D], so [B, N, H * D] (what the caller's projection wants) is a
  // free view of the returned [B, H, N, D] transpose.
  at::Tensor out = at::empty({sh.batch, sh.n, sh.heads, sh.d}, q.options());
  if (out.numel() == 0) return out.transpose(1, 2);

  const int64_t heads = sh.batch * sh.heads, k_size = sh.m_chunks() * sh.d_pairs(),
                v_size = sh.m_chunks() / 2 * sh.d_lanes();
  std::vector<Pair> packed(heads * (k_size + v_size));
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / sh.heads, h = bh % sh.heads;
      pack_keys(head_rows(k, b, h), sh, packed.data() + bh * (k_size + v_size));
      pack_values(head_rows(v, b, h), sh, packed.data() + bh * (k_size + v_size) + k_size);
    }
  });

  const int64_t blocks = (sh.n + kBlockQ - 1) / kBlockQ;
  const float mul = static_cast<float>(scale) * kLog2e;
  uint16_t* out_data = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  at::parallel_for(0, heads * blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch w(sh);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, q0 = (task % blocks) * kBlockQ;
      const int64_t b = bh / sh.heads, h = bh % sh.heads;
      const Pair* kp = packed.data() + bh * (k_size + v_size);
      attend_block(head_rows(q, b, h), q0, std::min(kBlockQ, sh.n - q0), kp, kp + k_size, sh,
                   mul, out_data + b * out.stride(0) + h * out.stride(2), out.stride(1), w);
    }
  });
  return out.transpose(1, 2);
}

}  // namespace
}  // namespace ldm::cpu

TORCH_LIBRARY_IMPL(ldm, CPU, m) {
  m.impl("flash_attention", &ldm::cpu::flash_attention_cpu);
}
#endif  // CPU_CAPABILITY_AVX512
