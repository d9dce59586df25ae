// CPU flash attention for bf16 on AMX tiles: the online softmax of attention.cpp with both
// products (q k^T and P v) as TDPBF16PS tile multiplies.
//
// Why: on a Xeon with AMX, oneDNN's tile matmuls make PyTorch's flash SDPA about 3.5x faster
// than the vdpbf16ps kernel of attention.cpp, and SDPA spends most of its time outside the
// matmuls: in the exponentials. This kernel keeps the tile products and makes the softmax
// cheaper (docs/kernels.md has the measurements).
//
// Algorithm, per task of kBlockQ query rows of one (batch, head), keys in blocks of kBlockK:
//   S = q k^T (tiles, fp32)                    m' = max(m, scale log2(e) rowmax S)
//   P = 2^(scale log2(e) S - m') (bf16)        l = l 2^(m - m') + rowsum P
//   O = O 2^(m - m') + P v (tiles, fp32)       out = O / l
//
// A tile is 16 rows of 64 bytes (32 bf16 or 16 fp32). TDPBF16PS C += A B takes A as 16 rows of
// 32 bf16 and B with its 32-long reduction dimension in pairs, 16 rows of [16 columns][2], so
// K and V are packed once per call into B tiles:
//   K: [32-key group][32-dim chunk][16-key half][pair of dims][key][2]
//   V: [32-key group][16-column tile][pair of keys][column][2]
// each zero past the last key and past d. q rows are copied into a zero-padded block; P rows
// are written by the softmax in the A layout directly.
//
// Registered in AVX-512 builds; the AMX instructions are compiled per function (target
// attribute) and run only after at::cpu::init_amx() says the CPU and the OS allow them.
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "csrc/cpu/attention_common.h"
#include "csrc/cpu/vec_helpers.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#define LDM_AMX __attribute__((target("amx-tile,amx-bf16")))

namespace ldm::cpu {
namespace {

constexpr int64_t kRowsPerTile = 16;
constexpr int64_t kTileK = 32;        // bf16 values along a 64-byte tile row
constexpr int64_t kTileValues = 512;  // bf16 values in one tile
constexpr int64_t kStrideB = 64;      // bytes between rows of a packed B tile
// 256 x 256 fp32 scores (256 KB) and their bf16 P stay in the core's L2 (2 MB per core on the
// Xeon measured); the fastest of the sizes tried there (rows 32-512, keys 128-4096).
constexpr int64_t kBlockQ = 256;
constexpr int64_t kBlockK = 256;

// The AMX tile configuration (palette 1): every tile 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

LDM_AMX void configure_tiles() {
  TileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = kRowsPerTile;
  }
  // GCC treats ldtilecfg's operand as unread and would drop the stores above without this.
  __asm__ __volatile__("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

LDM_AMX void release_tiles() { _tile_release(); }

struct Shape {
  int64_t batch, heads, n, m, d;
  int64_t d_chunks() const { return round_up(d, kTileK) / kTileK; }  // 32-wide q/K chunks
  int64_t d_tiles() const { return round_up(d, kRowsPerTile) / kRowsPerTile; }  // O tiles
  int64_t o_stride() const { return d_tiles() * kRowsPerTile; }
  int64_t key_groups() const { return round_up(m, kTileK) / kTileK; }
  int64_t k_size() const { return key_groups() * d_chunks() * 2 * kTileValues; }
  int64_t v_size() const { return key_groups() * d_tiles() * kTileValues; }
};

// The B tiles of one 32-key group of K: tile (chunk c, half) row p holds, for its 16 keys,
// the pair of dims (32 c + 2 p, 32 c + 2 p + 1): a 16 x 16 transpose of 32-bit pairs, done by
// one gather per row. Keys past m and dims past d are zero.
void pack_key_group(const Rows& k, const Shape& s, int64_t g, uint16_t* out) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                                            11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(k.row_stride)));
  for (int64_t c = 0; c < s.d_chunks(); ++c)
    for (int64_t half = 0; half < 2; ++half) {
      const int64_t key0 = g * kTileK + half * kRowsPerTile;
      const __mmask16 keys = first_lanes(s.m - key0);
      uint32_t* tile = reinterpret_cast<uint32_t*>(
          out + ((g * s.d_chunks() + c) * 2 + half) * kTileValues);
      for (int64_t p = 0; p < kRowsPerTile; ++p) {
        const int64_t dim = c * kTileK + 2 * p;
        __m512i pairs = _mm512_setzero_si512();
        if (dim + 1 < s.d) {
          pairs = _mm512_mask_i32gather_epi32(pairs, keys, rows,
                                              k.data + key0 * k.row_stride + dim, 2);
        } else if (dim < s.d) {  // odd d: the last dim alone (its neighbour may be out of bounds)
          alignas(64) uint32_t lone[kRowsPerTile] = {};
          for (int64_t j = 0; j < kRowsPerTile && key0 + j < s.m; ++j)
            lone[j] = k.at(key0 + j, dim);
          pairs = _mm512_load_si512(lone);
        }
        _mm512_storeu_si512(tile + p * kRowsPerTile, pairs);
      }
    }
}

// The B tiles of one 32-key group of V: tile t row j / 2 interleaves keys j and j + 1 over
// columns 16 t .. 16 t + 15. Keys past m and columns past d are zero.
void pack_value_group(const Rows& v, const Shape& s, int64_t g, uint16_t* out) {
  alignas(64) static constexpr int16_t kInterleave[32] = {
      0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i order = _mm512_load_si512(kInterleave);
  for (int64_t t = 0; t < s.d_tiles(); ++t) {
    const __mmask16 cols = first_lanes(s.d - t * kRowsPerTile);
    uint16_t* tile = out + (g * s.d_tiles() + t) * kTileValues;
    for (int64_t j = 0; j < kTileK; j += 2) {
      const int64_t key = g * kTileK + j;
      auto row = [&](int64_t kk) {
        return kk < s.m ? _mm256_maskz_loadu_epi16(
                              cols, v.data + kk * v.row_stride + t * kRowsPerTile)
                        : _mm256_setzero_si256();
      };
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(row(key)), row(key + 1), 1);
      _mm512_storeu_si512(tile + j * kRowsPerTile, _mm512_permutexvar_epi16(order, both));
    }
  }
}

// s[16 x keys] (row stride ls floats) = q[16 x 64] k^T for d <= 64: q stays in tiles 0 and 1
// while two 16-key accumulators (4, 7) alternate. keys is a multiple of 32.
LDM_AMX void scores_rows16(const uint16_t* q, int64_t lq, const uint16_t* k, int64_t chunks,
                           int64_t keys, float* s, int64_t ls) {
  _tile_loadd(0, q, lq * 2);
  if (chunks > 1) _tile_loadd(1, q + kTileK, lq * 2);
  for (int64_t j = 0; j < keys; j += kTileK) {
    const uint16_t* group = k + (j / kTileK) * chunks * 2 * kTileValues;
    _tile_zero(4);
    _tile_zero(7);
    _tile_loadd(2, group, kStrideB);
    _tile_loadd(5, group + kTileValues, kStrideB);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(7, 0, 5);
    if (chunks > 1) {
      _tile_loadd(3, group + 2 * kTileValues, kStrideB);
      _tile_loadd(6, group + 3 * kTileValues, kStrideB);
      _tile_dpbf16ps(4, 1, 3);
      _tile_dpbf16ps(7, 1, 6);
    }
    _tile_stored(4, s + j, ls * 4);
    _tile_stored(7, s + j + kRowsPerTile, ls * 4);
  }
}

// s[32 x 32] (row stride ls) = q[32 x d] k^T for one 32-key group, any d: 2 x 2 accumulators.
LDM_AMX void scores_32x32(const uint16_t* q, int64_t lq, const uint16_t* group, int64_t chunks,
                          float* s, int64_t ls) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(4, q + c * kTileK, lq * 2);
    _tile_loadd(5, q + kRowsPerTile * lq + c * kTileK, lq * 2);
    _tile_loadd(6, group + 2 * c * kTileValues, kStrideB);
    _tile_loadd(7, group + (2 * c + 1) * kTileValues, kStrideB);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, s, ls * 4);
  _tile_stored(1, s + kRowsPerTile, ls * 4);
  _tile_stored(2, s + kRowsPerTile * ls, ls * 4);
  _tile_stored(3, s + kRowsPerTile * ls + kRowsPerTile, ls * 4);
}

// o[16 x 16 n] (row stride lo floats) = (add ? o : 0) + p[16 x 32 groups] v for the n <= 4
// column tiles from `first` on.
LDM_AMX void output_rows16(const uint16_t* p, int64_t lp, const uint16_t* v, int64_t groups,
                           int64_t tiles, int64_t first, int n, float* o, int64_t lo,
                           bool add) {
  if (add) {
    _tile_loadd(0, o, lo * 4);
    if (n > 1) _tile_loadd(1, o + 16, lo * 4);
    if (n > 2) _tile_loadd(2, o + 32, lo * 4);
    if (n > 3) _tile_loadd(3, o + 48, lo * 4);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t g = 0; g < groups; ++g) {
    _tile_loadd(4, p + g * kTileK, lp * 2);
    const uint16_t* b = v + (g * tiles + first) * kTileValues;
    _tile_loadd(5, b, kStrideB);
    _tile_dpbf16ps(0, 4, 5);
    if (n > 1) {
      _tile_loadd(6, b + kTileValues, kStrideB);
      _tile_dpbf16ps(1, 4, 6);
    }
    if (n > 2) {
      _tile_loadd(7, b + 2 * kTileValues, kStrideB);
      _tile_dpbf16ps(2, 4, 7);
    }
    if (n > 3) {
      _tile_loadd(5, b + 3 * kTileValues, kStrideB);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  _tile_stored(0, o, lo * 4);
  if (n > 1) _tile_stored(1, o + 16, lo * 4);
  if (n > 2) _tile_stored(2, o + 32, lo * 4);
  if (n > 3) _tile_stored(3, o + 48, lo * 4);
}

// A buffer of n values of T from PyTorch's CPU allocator: 64-byte aligned, so tile rows that
// start at multiples of 64 bytes in it never straddle two cache lines (with malloc's 16-byte
// alignment, calls took 50 or 60 ms depending on where the buffers landed). Uninitialised.
template <typename T>
struct Buffer {
  at::Tensor storage;
  T* data;
  explicit Buffer(int64_t n)
      : storage(at::empty({n * static_cast<int64_t>(sizeof(T))}, at::kByte)),
        data(reinterpret_cast<T*>(storage.data_ptr<uint8_t>())) {}
  T* get() const { return data; }
};

// Per-thread buffers of one task (rows padded to 32); every value is written before it is read.
struct Scratch {
  Buffer<uint16_t> q;  // [rows][d_chunks * 32]
  Buffer<float> s;     // [rows][kBlockK]
  Buffer<uint16_t> p;  // [rows][kBlockK]
  Buffer<float> o;     // [rows][o_stride]
  Buffer<float> max, sum;
  explicit Scratch(const Shape& sh)
      : q(kBlockQ * sh.d_chunks() * kTileK), s(kBlockQ * kBlockK), p(kBlockQ * kBlockK),
        o(kBlockQ * sh.o_stride()), max(kBlockQ), sum(kBlockQ) {}
};

// One row's online-softmax step over `count` scores (`padded` = count rounded up to 32; P is
// zero in between): updates max and sum, rescales the row of O, writes P.
void softmax_row(const float* s, int64_t count, int64_t padded, float mul, bool first,
                 float& max, float& sum, float* o, int64_t o_len, uint16_t* p) {
  // Four running maxima and two running sums: one accumulator would make both passes wait on
  // its latency (measured 1.25x the time of this row step).
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 max0 = lowest, max1 = lowest, max2 = lowest, max3 = lowest;
  int64_t j = 0;
  for (; j + 4 * kLanes <= count; j += 4 * kLanes) {
    max0 = _mm512_max_ps(max0, _mm512_loadu_ps(s + j));
    max1 = _mm512_max_ps(max1, _mm512_loadu_ps(s + j + kLanes));
    max2 = _mm512_max_ps(max2, _mm512_loadu_ps(s + j + 2 * kLanes));
    max3 = _mm512_max_ps(max3, _mm512_loadu_ps(s + j + 3 * kLanes));
  }
  for (; j < count; j += kLanes)
    max0 = _mm512_mask_max_ps(max0, first_lanes(count - j), max0, _mm512_loadu_ps(s + j));
  const __m512 vmax = _mm512_max_ps(_mm512_max_ps(max0, max1), _mm512_max_ps(max2, max3));
  const float new_max = std::max(max, _mm512_reduce_max_ps(vmax) * mul);
  const float corr = first ? 0.0f : _mm512_cvtss_f32(exp2_poly3(_mm512_set1_ps(max - new_max)));
  const __m512 vmul = _mm512_set1_ps(mul), shift = _mm512_set1_ps(new_max);
  __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
  j = 0;
  for (; j + 2 * kLanes <= count; j += 2 * kLanes) {  // two vectors, one vcvtne2ps2bf16
    const __m512 e0 = exp2_poly3(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vmul, shift));
    const __m512 e1 = exp2_poly3(_mm512_fmsub_ps(_mm512_loadu_ps(s + j + kLanes), vmul, shift));
    sum0 = _mm512_add_ps(sum0, e0);
    sum1 = _mm512_add_ps(sum1, e1);
    _mm512_storeu_si512(p + j, to_bf16_pair(e0, e1));
  }
  for (; j < padded; j += kLanes) {
    const __mmask16 valid = first_lanes(count - j);
    const __m512 e = _mm512_maskz_mov_ps(
        valid, exp2_poly3(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(valid, s + j), vmul, shift)));
    sum0 = _mm512_add_ps(sum0, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), to_bf16_lanes(e));
  }
  max = new_max;
  sum = sum * corr + _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
  if (!first && corr != 1.0f) {
    const __m512 vcorr = _mm512_set1_ps(corr);
    for (int64_t e = 0; e < o_len; e += kLanes)
      _mm512_storeu_ps(o + e, _mm512_mul_ps(vcorr, _mm512_loadu_ps(o + e)));
  }
}

// Rows [q0, q0 + rows) of one head: out rows (stride out_stride) = attention of q over K, V.
LDM_AMX void attend_block(const Rows& q, int64_t q0, int64_t rows, const uint16_t* kp,
                          const uint16_t* vp, const Shape& sh, float mul, uint16_t* out,
                          int64_t out_stride, Scratch& w) {
  const int64_t chunks = sh.d_chunks(), lq = chunks * kTileK, tiles = sh.d_tiles(),
                lo = sh.o_stride(), padded_rows = round_up(rows, 2 * kRowsPerTile);
  for (int64_t r = 0; r < padded_rows; ++r) {
    uint16_t* dst = w.q.get() + r * lq;
    std::fill(dst, dst + lq, 0);
    if (r < rows) std::memcpy(dst, q.data + (q0 + r) * q.row_stride, sh.d * sizeof(uint16_t));
  }
  std::fill(w.max.get(), w.max.get() + padded_rows, -std::numeric_limits<float>::infinity());
  std::fill(w.sum.get(), w.sum.get() + padded_rows, 0.0f);
  for (int64_t k0 = 0; k0 < sh.m; k0 += kBlockK) {
    const int64_t count = std::min(kBlockK, sh.m - k0), padded = round_up(count, kTileK);
    const uint16_t* kb = kp + (k0 / kTileK) * chunks * 2 * kTileValues;
    // Each product for all rows in one go: the tile unit runs back to back (interleaving the
    // products with the softmax per 32 rows measured 1.2x slower).
    if (chunks <= 2) {
      for (int64_t r = 0; r < padded_rows; r += kRowsPerTile)
        scores_rows16(w.q.get() + r * lq, lq, kb, chunks, padded, w.s.get() + r * kBlockK,
                      kBlockK);
    } else {
      for (int64_t r = 0; r < padded_rows; r += 2 * kRowsPerTile)
        for (int64_t j = 0; j < padded; j += kTileK)
          scores_32x32(w.q.get() + r * lq, lq, kb + (j / kTileK) * chunks * 2 * kTileValues,
                       chunks, w.s.get() + r * kBlockK + j, kBlockK);
    }
    for (int64_t r = 0; r < padded_rows; ++r)
      softmax_row(w.s.get() + r * kBlockK, count, padded, mul, k0 == 0, w.max.get()[r],
                  w.sum.get()[r], w.o.get() + r * lo, lo, w.p.get() + r * kBlockK);
    const uint16_t* vb = vp + (k0 / kTileK) * tiles * kTileValues;
    for (int64_t r = 0; r < padded_rows; r += kRowsPerTile)
      for (int64_t t = 0; t < tiles; t += 4)
        output_rows16(w.p.get() + r * kBlockK, kBlockK, vb, padded / kTileK, tiles, t,
                      static_cast<int>(std::min<int64_t>(4, tiles - t)),
                      w.o.get() + r * lo + t * kRowsPerTile, lo, k0 > 0);
  }
  for (int64_t r = 0; r < rows; ++r)
    store_normalised_row(w.o.get() + r * lo, 1.0f / w.sum.get()[r], sh.d,
                         out + (q0 + r) * out_stride);
}

at::Tensor flash_attention_amx_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                   const at::Tensor& v_in, double scale) {
  check_attention_inputs("flash_attention_amx", q_in, k_in, v_in);
  TORCH_CHECK(at::cpu::init_amx(),
              "flash_attention_amx: this CPU or OS does not allow AMX tiles (amx_bf16)");
  auto rows_contiguous = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  const at::Tensor q = rows_contiguous(q_in), k = rows_contiguous(k_in), v = rows_contiguous(v_in);
  const Shape sh{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
  at::Tensor out = at::empty({sh.batch, sh.n, sh.heads, sh.d}, q.options());
  if (out.numel() == 0) return out.transpose(1, 2);

  const int64_t heads = sh.batch * sh.heads, per_head = sh.k_size() + sh.v_size();
  // One buffer per head, uninitialised (the packers write every value, padding included).
  // Per head, an SD self-attention's 1 MB blocks stay under the allocator's mmap threshold
  // (8 MiB in bf16, ldm.runtime.tune_allocator) and are reused from the heap on every call;
  // one 10 MB buffer was mapped afresh each time, and its page faults took about a sixth of
  // the call.
  std::vector<Buffer<uint16_t>> packed;
  packed.reserve(heads);
  for (int64_t bh = 0; bh < heads; ++bh) packed.emplace_back(per_head);
  const int64_t groups = sh.key_groups();
  at::parallel_for(0, heads * groups, 8, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / groups, g = task % groups, b = bh / sh.heads, h = bh % sh.heads;
      pack_key_group(head_rows(k, b, h), sh, g, packed[bh].get());
      pack_value_group(head_rows(v, b, h), sh, g, packed[bh].get() + sh.k_size());
    }
  });

  const int64_t blocks = (sh.n + kBlockQ - 1) / kBlockQ;
  const float mul = static_cast<float>(scale) * kLog2e;
  uint16_t* out_data = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  at::parallel_for(0, heads * blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch w(sh);
    configure_tiles();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, q0 = (task % blocks) * kBlockQ;
      const int64_t b = bh / sh.heads, h = bh % sh.heads;
      const uint16_t* kp = packed[bh].get();
      attend_block(head_rows(q, b, h), q0, std::min(kBlockQ, sh.n - q0), kp, kp + sh.k_size(),
                   sh, mul, out_data + b * out.stride(0) + h * out.stride(2), out.stride(1), w);
    }
    release_tiles();
  });
  return out.transpose(1, 2);
}

}  // namespace
}  // namespace ldm::cpu

TORCH_LIBRARY_IMPL(ldm, CPU, m) {
  m.impl("flash_attention_amx", &ldm::cpu::flash_attention_amx_cpu);
}
#endif  // CPU_CAPABILITY_AVX512
