// Low-bit projections on the CPU: y = x @ Wᵀ with W read from QuantizedLinear's tensors as they lie (engine/low_bit.py;
// GGUF's Q4_0 / Q4_1 / Q8_0 layouts), never from a second copy of the weights. engine/cpu_low_bit.py builds and calls it.
//
// Two paths, both computing dot products along K (W's rows and x's rows are both contiguous along K, so nothing is
// transposed):
// - few rows of x (decode at small batch): each weight row is dequantized in registers as it streams from memory and
//   used by every row of x at once. Memory-bound for float32, so reading 1/4 (int8) or ~1/7 (int4) of its bytes is
//   the gain.
// - more rows: each thread dequantizes a panel of W's rows into a float32 buffer small enough to stay in L2, then a
//   register-blocked micro-kernel multiplies every row of x against it: the dequantization is paid once per weight
//   and the multiply runs at float32 GEMM speed.
//
// Weights come out exactly as QuantizedLinear.dequantize computes them: w = q * s + a with (s, a) = (scale, 0) for
// int8, (scale, -8 * scale) for symmetric int4 and (scale, offset) for asymmetric int4. q * s is exact in float32
// (a small integer times a float16), so the fused multiply-add rounds once, where the reference's add does. A 4-bit
// group's 16 weights are computed so once and looked up; int8 with one scale per row, on the few-rows path, sums
// x * q and multiplies the sums by the scale (the same product, rounded in another order).
//
// AVX-512 (x86-64 -march=native on a CPU that has it) gets intrinsics, and so does AVX2 + FMA + F16C (the same
// design in 256-bit vectors; INFERQ_CPU_MARCH=haswell builds it on an AVX-512 machine, which is how it is tested);
// every other CPU the portable path (the panel path for every row count, in loops and generic vectors that the
// compiler turns into SSE or NEON; building with -DINFERQ_PORTABLE selects it anywhere).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__) && \
    !defined(INFERQ_PORTABLE)
#define INFERQ_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(INFERQ_PORTABLE)
// Most x86 CPUs without AVX-512 (Haswell on, Zen 1-3): the same design in 256-bit vectors, 16 registers.
#define INFERQ_AVX2 1
#include <immintrin.h>
#endif

namespace {

// Runs of 32 inputs: byte j of a run holds input j (low nibble) and input j + 16 (high nibble).
constexpr int64_t kRun = 32;
// Floats per vector: the panel stores K in vectors of 16 (zero-padded past K).
constexpr int64_t kLanes = 16;
// Rows of x up to which weights are dequantized in registers rather than into a panel (the intrinsics paths only).
constexpr int64_t kStreamRows = 4;
constexpr int kStreamCols = 4;  // weight rows per stream tile
#ifdef INFERQ_AVX2
constexpr int kPanelRows = 2;   // 16 registers: 2 x 6 accumulators + 2 vectors of x + 1 weight vector
#else
constexpr int kPanelRows = 4;   // rows of x per panel tile
#endif
constexpr int kPanelCols = 6;   // weight rows per panel tile: 4 x 6 accumulators + 6 weight vectors fit 32 registers
constexpr int64_t kSplit = 12;  // threads split W's rows in blocks of this (a multiple of both tiles' widths)
// The panel of dequantized rows one thread works on: about this many bytes, so that it stays in L2 while every row
// of x passes over it.
constexpr int64_t kPanelBytes = 128 * 1024;
// Multiply-adds below which a thread is not worth waking (tens of microseconds of work).
constexpr int64_t kMinWorkPerThread = 1 << 16;
// Claims of rows per thread (matmul): enough that a late thread's share is taken over in small steps, few enough
// that the shared counter costs nothing next to a claim's work.
constexpr int64_t kClaimsPerThread = 8;

struct QWeight {
  const uint8_t* q;        // 4-bit: [N, K / 2] nibble pairs; 8-bit: int8 [N, K]
  const at::Half* scale;   // [N, K / group]
  const at::Half* offset;  // like scale, or nullptr (4-bit asymmetric only)
  int64_t n, k, group, bits;

  int64_t groups() const { return k / group; }
  int64_t row_bytes() const { return bits == 4 ? k / 2 : k; }
  const uint8_t* row(int64_t r) const { return q + r * row_bytes(); }
};

inline float half_to_float(at::Half h) {
#if defined(INFERQ_AVX512) || defined(INFERQ_AVX2)
  return _cvtsh_ss(h.x);
#else
  return static_cast<float>(h);
#endif
}

// w = q * s + a within group g of row r.
inline void group_affine(const QWeight& w, int64_t r, int64_t g, float& s, float& a) {
  s = half_to_float(w.scale[r * w.groups() + g]);
  a = w.bits == 8 ? 0.f : w.offset != nullptr ? half_to_float(w.offset[r * w.groups() + g]) : -8.f * s;
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------------------------
// Panels. A tile of kPanelCols weight rows is stored interleaved by vectors: vector v of row j (its inputs 16v ..
// 16v + 15) at floats (v * kPanelCols + j) * 16, so the micro-kernel walks one pointer through all six rows.
// dequant_row writes row r's vector v at dst + v * stride, zeros past K.

#ifdef INFERQ_AVX512
inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

// 16 int8 weights as floats. Masked loads only where K ends mid-vector (`tail`): streaming a weight from memory
// through masked loads ran at a quarter of the bandwidth of plain ones (measured on Zen 5: the prefetchers seem
// not to follow them).
template <bool tail>
inline __m512 int8_vector(const uint8_t* p, __mmask16 m) {
  const __m128i bytes = tail ? _mm_maskz_loadu_epi8(m, p) : _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
}

template <bool tail>
inline __m512 float_vector(const float* p, __mmask16 m) {
  return tail ? _mm512_maskz_loadu_ps(m, p) : _mm512_loadu_ps(p);
}

// A 4-bit group has only 16 distinct weights: lane q holds q * s + a, computed as dequantize computes it. vpermps
// (_mm512_permutexvar_ps) then turns a vector of nibbles into their weights in one instruction, reading only the
// low 4 bits of each index, where convert-then-multiply-add takes two and the low nibble a mask besides.
inline __m512 nibble_table(__m512 vs, __m512 va) {
  const __m512 q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_fmadd_ps(q, vs, va);
}

void dequant_row(const QWeight& w, int64_t r, float* dst, int64_t stride) {
  const uint8_t* q = w.row(r);
  for (int64_t g = 0; g < w.groups(); ++g) {
    float s, a;
    group_affine(w, r, g, s, a);
    const __m512 vs = _mm512_set1_ps(s), va = _mm512_set1_ps(a);
    const int64_t k0 = g * w.group, k1 = k0 + w.group;
    if (w.bits == 8) {
      // Any group size: one per row need not be a multiple of 16. Groups of 32 start on a vector; a group of
      // K is the only one, so the masked tail (zeros past K, as a = 0) is the row's end.
      int64_t k = k0;
      for (; k + kLanes <= k1; k += kLanes)
        _mm512_storeu_ps(dst + k / kLanes * stride, _mm512_fmadd_ps(int8_vector<false>(q + k, 0), vs, va));
      if (k < k1) {
        const __m512 tail = int8_vector<true>(q + k, tail_mask(k1 - k));
        _mm512_storeu_ps(dst + k / kLanes * stride, _mm512_fmadd_ps(tail, vs, va));
      }
      continue;
    }
    const __m512 table = nibble_table(vs, va);
    for (int64_t run = k0; run < k1; run += kRun) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + run / 2)));
      float* out = dst + run / kLanes * stride;
      _mm512_storeu_ps(out, _mm512_permutexvar_ps(v, table));  // the low nibble: vpermps reads 4 bits
      _mm512_storeu_ps(out + stride, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table));
    }
  }
}
#elif defined(INFERQ_AVX2)
// 256-bit vectors: a panel vector of 16 floats is two of them (kHalf floats each).
constexpr int64_t kHalf = 8;

// Inputs p[0 .. n) of x as floats, zeros past n (n < 8: where K ends mid-vector, at most once per row). AVX2 has no
// masked byte loads, so the tails, of x and of the weights alike, go through a small zeroed copy; the loops over
// whole vectors use plain loads only (see int8_vector on AVX-512).
inline __m256 float_tail(const float* p, int64_t n) {
  alignas(32) float buf[kHalf] = {};
  std::memcpy(buf, p, n * sizeof(float));
  return _mm256_load_ps(buf);
}

// 8 int8 weights as floats: one 8-byte load, sign-extended, converted (plain loads: see the AVX-512 comment).
inline __m256 int8_vector(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline __m256 int8_tail(const uint8_t* p, int64_t n) {
  alignas(16) uint8_t buf[16] = {};
  std::memcpy(buf, p, n);
  return int8_vector(buf);
}

// 8 bytes of nibble pairs, zero-extended to 32-bit lanes: (v & 15) is the low nibbles' inputs, v >> 4 the high ones.
inline __m256i nibble_bytes(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// The weights of 8 nibbles: q * s + a as dequantize computes it (q * s exact, one rounding). A 16-entry table as
// on AVX-512 would take two vpermps and a blend here (vpermps indexes only 8 lanes), more than convert + FMA.
inline __m256 nibble_weights(__m256i nib, __m256 vs, __m256 va) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(nib), vs, va);
}

void dequant_row(const QWeight& w, int64_t r, float* dst, int64_t stride) {
  const uint8_t* q = w.row(r);
  const __m256i low = _mm256_set1_epi32(0xF);
  for (int64_t g = 0; g < w.groups(); ++g) {
    float s, a;
    group_affine(w, r, g, s, a);
    const __m256 vs = _mm256_set1_ps(s), va = _mm256_set1_ps(a);
    const int64_t k0 = g * w.group, k1 = k0 + w.group;
    if (w.bits == 8) {
      // As on AVX-512: a group of 32 starts on a vector; one of K is the only one, so the tail (zeros past K, as
      // a = 0) is the row's end. Half-vectors of 8 go to dst + (k / 16) * stride + k % 16.
      int64_t k = k0;
      for (; k + kHalf <= k1; k += kHalf)
        _mm256_storeu_ps(dst + k / kLanes * stride + k % kLanes, _mm256_fmadd_ps(int8_vector(q + k), vs, va));
      if (k < k1)
        _mm256_storeu_ps(dst + k / kLanes * stride + k % kLanes, _mm256_fmadd_ps(int8_tail(q + k, k1 - k), vs, va));
      if (k1 % kLanes != 0 && k1 % kLanes <= kHalf)  // the second half of the last vector: zeros
        _mm256_storeu_ps(dst + k1 / kLanes * stride + kHalf, _mm256_setzero_ps());
      continue;
    }
    for (int64_t run = k0; run < k1; run += kRun) {
      float* out = dst + run / kLanes * stride;
      for (int h = 0; h < 2; ++h) {  // bytes 8h .. 8h + 7: inputs 8h .. (low nibbles) and 16 + 8h .. (high ones)
        const __m256i v = nibble_bytes(q + run / 2 + h * kHalf);
        _mm256_storeu_ps(out + h * kHalf, nibble_weights(_mm256_and_si256(v, low), vs, va));
        _mm256_storeu_ps(out + stride + h * kHalf, nibble_weights(_mm256_srli_epi32(v, 4), vs, va));
      }
    }
  }
}
#else
// Every loop below runs over the 16 contiguous floats of one panel vector, so the compiler vectorises each
// (per-element index arithmetic, k / 16 and k % 16, would keep it scalar).
void dequant_row(const QWeight& w, int64_t r, float* dst, int64_t stride) {
  const uint8_t* q = w.row(r);
  for (int64_t g = 0; g < w.groups(); ++g) {
    float s, a;
    group_affine(w, r, g, s, a);
    const int64_t k0 = g * w.group, k1 = k0 + w.group;
    if (w.bits == 8) {
      // A group of 32 starts on a vector; one of K is the only one, so the zeros past K are the row's end.
      const int8_t* src = reinterpret_cast<const int8_t*>(q);
      for (int64_t k = k0; k < k1; k += kLanes) {
        float* out = dst + k / kLanes * stride;
        const int64_t n = std::min(kLanes, k1 - k);
        for (int64_t l = 0; l < n; ++l) out[l] = static_cast<float>(src[k + l]) * s + a;
        for (int64_t l = n; l < kLanes; ++l) out[l] = 0.f;
      }
      continue;
    }
    for (int64_t run = k0; run < k1; run += kRun) {  // one run is two whole vectors
      float* lo = dst + run / kLanes * stride;
      float* hi = lo + stride;
      const uint8_t* src = q + run / 2;
      for (int64_t j = 0; j < kLanes; ++j) {
        lo[j] = static_cast<float>(src[j] & 0xF) * s + a;
        hi[j] = static_cast<float>(src[j] >> 4) * s + a;
      }
    }
  }
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// Micro-kernels: c[i * ldc + j] = dot(x row i, weight row j), for i < MR rows of x and j < NR weight rows; only the
// first `cols` of the NR outputs are stored (the last tile of a panel may be partly padding).

#ifdef INFERQ_AVX512
// Register tiles are arrays of vectors indexed by loops of constant bounds. GCC keeps such an array in registers only
// when every index is a constant by the time it scalarizes, so these loops are unrolled fully and the helpers that
// touch the arrays inlined; otherwise it stores every accumulator to the stack on each iteration (3x slower).
#define INFERQ_UNROLL _Pragma("GCC unroll 16")
#define INFERQ_INLINE inline __attribute__((always_inline))

// The four sums of a0..a3 as one vector [Σa0, Σa1, Σa2, Σa3]: 13 instructions instead of 4 full reductions.
INFERQ_INLINE __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  const __m512d d0 = _mm512_castps_pd(t0), d1 = _mm512_castps_pd(t1);
  const __m512 t = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d0, d1)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(d0, d1)));  // per 128-bit lane: 4 partials
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// c[i * ldc + j] = the sum of acc[i][j]'s lanes, for j < cols: four at a time through reduce4.
template <int MR, int NR>
INFERQ_INLINE void store_sums(__m512 (&acc)[MR][NR], float* c, int64_t ldc, int64_t cols) {
  const __m512 zero = _mm512_setzero_ps();
  INFERQ_UNROLL for (int i = 0; i < MR; ++i) {
    INFERQ_UNROLL for (int j = 0; j < NR; j += 4) {
      const __m128 sums = reduce4(acc[i][j], j + 1 < NR ? acc[i][j + 1] : zero, j + 2 < NR ? acc[i][j + 2] : zero,
                                  j + 3 < NR ? acc[i][j + 3] : zero);
      const int64_t left = cols - j;
      if (left >= 4) {
        _mm_storeu_ps(c + i * ldc + j, sums);
      } else if (left > 0) {
        _mm_mask_storeu_ps(c + i * ldc + j, __mmask8((1u << left) - 1), sums);
      }
    }
  }
}

// b: one interleaved panel tile of NR rows, `vectors` vectors each; a: MR rows of x, zero-padded to whole vectors.
template <int MR, int NR>
void tile(const float* a, int64_t lda, const float* b, int64_t vectors, float* c, int64_t ldc, int64_t cols) {
  __m512 acc[MR][NR];
  INFERQ_UNROLL for (int i = 0; i < MR; ++i)
    INFERQ_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t v = 0; v < vectors; ++v, b += NR * kLanes) {
    __m512 bv[NR];
    INFERQ_UNROLL for (int j = 0; j < NR; ++j) {
      // Held in a register: GCC would rather fold the load into each of the MR multiply-adds that use it, and those
      // extra loads, not the multiply-adds, would then bound the kernel. (A local, not bv[j]: an array element as
      // an asm operand makes GCC keep the array in memory.)
      __m512 loaded = _mm512_loadu_ps(b + j * kLanes);
      asm("" : "+v"(loaded));
      bv[j] = loaded;
    }
    INFERQ_UNROLL for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_loadu_ps(a + i * lda + v * kLanes);
      INFERQ_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
  store_sums<MR, NR>(acc, c, ldc, cols);
}

// Inputs k .. k + 15 (those of mask m where `tail`) of NR int8 weight rows against MR rows of x, added to acc.
template <int MR, int NR, bool tail>
INFERQ_INLINE void int8_step(const uint8_t* const (&rows)[NR], int64_t k, __mmask16 m, const float* x, int64_t ldx,
                             bool per_row, const __m512 (&vs)[NR], __m512 (&acc)[MR][NR]) {
  __m512 wv[NR];
  INFERQ_UNROLL for (int j = 0; j < NR; ++j) {
    const __m512 q = int8_vector<tail>(rows[j] + k, m);
    wv[j] = per_row ? q : _mm512_mul_ps(q, vs[j]);
  }
  INFERQ_UNROLL for (int i = 0; i < MR; ++i) {
    const __m512 xv = float_vector<tail>(x + i * ldx + k, m);
    INFERQ_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
  }
}

// The few-rows path: NR weight rows from row r on, dequantized in registers, against MR rows of x (all of K).
template <int MR, int NR>
void stream_tile(const QWeight& w, int64_t r, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t cols) {
  __m512 acc[MR][NR];
  INFERQ_UNROLL for (int i = 0; i < MR; ++i)
    INFERQ_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const uint8_t* rows[NR];
  INFERQ_UNROLL for (int j = 0; j < NR; ++j) rows[j] = w.row(r + j);
  // int8 with one scale per row (the default): sum x * q, then multiply each sum by its row's scale once, instead
  // of every weight (the result differs from the reference's order only in rounding).
  const bool per_row = w.bits == 8 && w.groups() == 1;
  for (int64_t g = 0; g < w.groups(); ++g) {
    __m512 vs[NR], va[NR];
    INFERQ_UNROLL for (int j = 0; j < NR; ++j) {
      float s, a;
      group_affine(w, r + j, g, s, a);
      vs[j] = _mm512_set1_ps(s);
      va[j] = _mm512_set1_ps(a);
    }
    const int64_t k0 = g * w.group, k1 = k0 + w.group;
    if (w.bits == 8) {
      int64_t k = k0;
      for (; k + kLanes <= k1; k += kLanes) int8_step<MR, NR, false>(rows, k, 0, x, ldx, per_row, vs, acc);
      // One scale per row: K need not be a multiple of 16.
      if (k < k1) int8_step<MR, NR, true>(rows, k, tail_mask(k1 - k), x, ldx, per_row, vs, acc);
      if (per_row) {
        INFERQ_UNROLL for (int i = 0; i < MR; ++i)
          INFERQ_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_mul_ps(acc[i][j], vs[j]);
      }
      continue;
    }
    __m512 table[NR];
    INFERQ_UNROLL for (int j = 0; j < NR; ++j) table[j] = nibble_table(vs[j], va[j]);
    for (int64_t run = k0; run < k1; run += kRun) {
      __m512i v[NR];
      INFERQ_UNROLL for (int j = 0; j < NR; ++j)
        v[j] = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[j] + run / 2)));
      // Inputs run .. run + 15 (the low nibbles), then run + 16 .. run + 31 (the high ones).
      INFERQ_UNROLL for (int half = 0; half < 2; ++half) {
        __m512 wv[NR];
        INFERQ_UNROLL for (int j = 0; j < NR; ++j) {
          const __m512i nib = half == 0 ? v[j] : _mm512_srli_epi32(v[j], 4);
          wv[j] = _mm512_permutexvar_ps(nib, table[j]);
        }
        INFERQ_UNROLL for (int i = 0; i < MR; ++i) {
          const __m512 xv = _mm512_loadu_ps(x + i * ldx + run + kLanes * half);
          INFERQ_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
      }
    }
  }
  store_sums<MR, NR>(acc, y + r, ldy, cols);
}
#elif defined(INFERQ_AVX2)
#define INFERQ_UNROLL _Pragma("GCC unroll 16")
#define INFERQ_INLINE inline __attribute__((always_inline))

// The four sums of a0..a3 as one vector [Σa0, Σa1, Σa2, Σa3].
INFERQ_INLINE __m128 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));  // per 128-bit lane
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

template <int MR, int NR>
INFERQ_INLINE void store_sums(__m256 (&acc)[MR][NR], float* c, int64_t ldc, int64_t cols) {
  const __m256 zero = _mm256_setzero_ps();
  INFERQ_UNROLL for (int i = 0; i < MR; ++i) {
    INFERQ_UNROLL for (int j = 0; j < NR; j += 4) {
      const __m128 sums = reduce4(acc[i][j], j + 1 < NR ? acc[i][j + 1] : zero, j + 2 < NR ? acc[i][j + 2] : zero,
                                  j + 3 < NR ? acc[i][j + 3] : zero);
      const int64_t left = cols - j;
      if (left >= 4) {
        _mm_storeu_ps(c + i * ldc + j, sums);
      } else if (left > 0) {
        alignas(16) float out[4];
        _mm_store_ps(out, sums);
        for (int64_t l = 0; l < left; ++l) c[i * ldc + j + l] = out[l];
      }
    }
  }
}

// As on AVX-512, over both halves of each panel vector into the same accumulators. With 16 registers: MR = 2 rows
// of x against the NR = 6 rows of a tile (12 accumulators), each weight half-vector loaded once into a register and
// used by both rows, the two x vectors held.
template <int MR, int NR>
void tile(const float* a, int64_t lda, const float* b, int64_t vectors, float* c, int64_t ldc, int64_t cols) {
  __m256 acc[MR][NR];
  INFERQ_UNROLL for (int i = 0; i < MR; ++i)
    INFERQ_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t v = 0; v < vectors; ++v, b += NR * kLanes) {
    INFERQ_UNROLL for (int h = 0; h < 2; ++h) {
      __m256 av[MR];
      INFERQ_UNROLL for (int i = 0; i < MR; ++i) av[i] = _mm256_loadu_ps(a + i * lda + v * kLanes + h * kHalf);
      INFERQ_UNROLL for (int j = 0; j < NR; ++j) {
        __m256 bv = _mm256_loadu_ps(b + j * kLanes + h * kHalf);
        asm("" : "+x"(bv));  // one load for the MR multiply-adds, not one folded into each
        INFERQ_UNROLL for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(av[i], bv, acc[i][j]);
      }
    }
  }
  store_sums<MR, NR>(acc, c, ldc, cols);
}

// The few-rows path, as on AVX-512: NR weight rows from row r on, dequantized in registers, against MR rows of x.
// 16 registers: MR x NR accumulators + NR weight vectors + one of x, so NR = 4 for one or two rows of x, 2 beyond.
template <int MR, int NR>
void stream_tile(const QWeight& w, int64_t r, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t cols) {
  __m256 acc[MR][NR];
  INFERQ_UNROLL for (int i = 0; i < MR; ++i)
    INFERQ_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  const uint8_t* rows[NR];
  INFERQ_UNROLL for (int j = 0; j < NR; ++j) rows[j] = w.row(r + j);
  // int8 with one scale per row: the sums of x * q, multiplied by the row's scale once (see the AVX-512 path).
  const bool per_row = w.bits == 8 && w.groups() == 1;
  const __m256i low = _mm256_set1_epi32(0xF);
  for (int64_t g = 0; g < w.groups(); ++g) {
    __m256 vs[NR], va[NR];
    INFERQ_UNROLL for (int j = 0; j < NR; ++j) {
      float s, a;
      group_affine(w, r + j, g, s, a);
      vs[j] = _mm256_set1_ps(s);
      va[j] = _mm256_set1_ps(a);
    }
    const int64_t k0 = g * w.group, k1 = k0 + w.group;
    if (w.bits == 8) {
      int64_t k = k0;
      for (; k + kHalf <= k1; k += kHalf) {
        __m256 wv[NR];
        INFERQ_UNROLL for (int j = 0; j < NR; ++j) {
          const __m256 q = int8_vector(rows[j] + k);
          wv[j] = per_row ? q : _mm256_mul_ps(q, vs[j]);
        }
        INFERQ_UNROLL for (int i = 0; i < MR; ++i) {
          const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
          INFERQ_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
      }
      if (k < k1) {  // one scale per row: K need not be a multiple of 8
        __m256 wv[NR];
        INFERQ_UNROLL for (int j = 0; j < NR; ++j) {
          const __m256 q = int8_tail(rows[j] + k, k1 - k);
          wv[j] = per_row ? q : _mm256_mul_ps(q, vs[j]);
        }
        INFERQ_UNROLL for (int i = 0; i < MR; ++i) {
          const __m256 xv = float_tail(x + i * ldx + k, k1 - k);
          INFERQ_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
      }
      if (per_row) {
        INFERQ_UNROLL for (int i = 0; i < MR; ++i)
          INFERQ_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_mul_ps(acc[i][j], vs[j]);
      }
      continue;
    }
    for (int64_t run = k0; run < k1; run += kRun) {
      // Bytes 8h .. 8h + 7 of the run: inputs run + 8h .. (low nibbles), run + 16 + 8h .. (high ones).
      INFERQ_UNROLL for (int h = 0; h < 2; ++h) {
        __m256i v[NR];
        INFERQ_UNROLL for (int j = 0; j < NR; ++j) v[j] = nibble_bytes(rows[j] + run / 2 + h * kHalf);
        INFERQ_UNROLL for (int half = 0; half < 2; ++half) {
          __m256 wv[NR];
          INFERQ_UNROLL for (int j = 0; j < NR; ++j)
            wv[j] = nibble_weights(half == 0 ? _mm256_and_si256(v[j], low) : _mm256_srli_epi32(v[j], 4), vs[j], va[j]);
          INFERQ_UNROLL for (int i = 0; i < MR; ++i) {
            const __m256 xv = _mm256_loadu_ps(x + i * ldx + run + kLanes * half + h * kHalf);
            INFERQ_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
          }
        }
      }
    }
  }
  store_sums<MR, NR>(acc, y + r, ldy, cols);
}
#else
// The compiler's generic vectors, as wide as the target's registers (AVX: 8 floats; else 4, which SSE and NEON
// have): wider ones GCC would split through the stack. A panel vector of 16 floats is kParts of them. Loaded
// through memcpy, as x's rows and the panel need not be aligned.
#ifdef __AVX__
constexpr int kVecFloats = 8;
#else
constexpr int kVecFloats = 4;
#endif
constexpr int kParts = kLanes / kVecFloats;
typedef float Vec __attribute__((vector_size(kVecFloats * sizeof(float))));

inline Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// One row of x against the NR rows of a panel tile: NR accumulators per part, so each vector of x is loaded once
// for all of them (NR = 6 with AVX2: 12 registers, plus 2 for x). A row at a time, as more would not fit 16
// registers. The loops over the accumulators are unrolled fully, so that GCC keeps them in registers.
template <int NR>
void tile_row(const float* a, const float* b, int64_t vectors, float* c, int64_t cols) {
  Vec acc[NR][kParts] = {};
  for (int64_t v = 0; v < vectors; ++v, b += NR * kLanes) {
    Vec av[kParts];
#pragma GCC unroll 16
    for (int p = 0; p < kParts; ++p) av[p] = load_vec(a + v * kLanes + p * kVecFloats);
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j)
#pragma GCC unroll 16
      for (int p = 0; p < kParts; ++p) acc[j][p] += av[p] * load_vec(b + j * kLanes + p * kVecFloats);
  }
  for (int j = 0; j < NR && j < cols; ++j) {
    float sum = 0.f;
    for (int p = 0; p < kParts; ++p)
      for (int l = 0; l < kVecFloats; ++l) sum += acc[j][p][l];
    c[j] = sum;
  }
}

template <int MR, int NR>
void tile(const float* a, int64_t lda, const float* b, int64_t vectors, float* c, int64_t ldc, int64_t cols) {
  for (int i = 0; i < MR; ++i) tile_row<NR>(a + i * lda, b, vectors, c + i * ldc, cols);
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// Drivers. Each thread gets a range of W's rows (the outputs' columns) and reads only those weights.

template <int MR>
void panel_tile(const float* a, int64_t lda, const float* b, int64_t vectors, float* c, int64_t ldc, int64_t cols) {
  tile<MR, kPanelCols>(a, lda, b, vectors, c, ldc, cols);
}

// Every row of x (zero-padded to whole vectors) against weight rows [r0, r1): panels of dequantized rows, each
// multiplied by all of x.
void panel_rows(const QWeight& w, const float* x, int64_t ldx, int64_t m, float* y, int64_t r0, int64_t r1) {
  const int64_t vectors = round_up(w.k, kLanes) / kLanes;
  const int64_t tile_floats = kPanelCols * vectors * kLanes;
  const int64_t tiles = std::max<int64_t>(1, kPanelBytes / (tile_floats * 4));
  // One buffer per thread, kept between calls: a fresh large allocation would fault its pages in every time. It
  // starts zeroed, and only ever holds finite weights: a partial last tile reads rows past the panel's end, whose
  // sums are not stored.
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < tiles * tile_floats) buffer.assign(tiles * tile_floats, 0.f);
  for (int64_t p0 = r0; p0 < r1; p0 += tiles * kPanelCols) {
    const int64_t rows = std::min(tiles * kPanelCols, r1 - p0);
    for (int64_t r = 0; r < rows; ++r)
      dequant_row(w, p0 + r, buffer.data() + r / kPanelCols * tile_floats + r % kPanelCols * kLanes,
                  kPanelCols * kLanes);
    for (int64_t i = 0; i < m; i += kPanelRows) {
      const float* a = x + i * ldx;
      for (int64_t j = 0; j < rows; j += kPanelCols) {
        const float* b = buffer.data() + j / kPanelCols * tile_floats;
        float* c = y + i * w.n + p0 + j;
        const int64_t cols = std::min<int64_t>(kPanelCols, rows - j);
        switch (std::min<int64_t>(kPanelRows, m - i)) {
          case 1: panel_tile<1>(a, ldx, b, vectors, c, w.n, cols); break;
          case 2: panel_tile<2>(a, ldx, b, vectors, c, w.n, cols); break;
          case 3: panel_tile<3>(a, ldx, b, vectors, c, w.n, cols); break;
          default: panel_tile<kPanelRows>(a, ldx, b, vectors, c, w.n, cols); break;
        }
      }
    }
  }
}

#if defined(INFERQ_AVX512) || defined(INFERQ_AVX2)
constexpr bool kHasStream = true;

template <int MR>
void stream_rows_mr(const QWeight& w, const float* x, int64_t ldx, float* y, int64_t r0, int64_t r1) {
#ifdef INFERQ_AVX2
  constexpr int cols = MR <= 2 ? kStreamCols : 2;  // what 16 registers hold (stream_tile)
#else
  constexpr int cols = kStreamCols;
#endif
  int64_t r = r0;
  for (; r + cols <= r1; r += cols) stream_tile<MR, cols>(w, r, x, ldx, y, w.n, cols);
  for (; r < r1; ++r) stream_tile<MR, 1>(w, r, x, ldx, y, w.n, 1);
}

// At most kStreamRows rows of x against weight rows [r0, r1), dequantized in registers.
void stream_rows(const QWeight& w, const float* x, int64_t ldx, int64_t m, float* y, int64_t r0, int64_t r1) {
  switch (m) {
    case 1: stream_rows_mr<1>(w, x, ldx, y, r0, r1); break;
    case 2: stream_rows_mr<2>(w, x, ldx, y, r0, r1); break;
    case 3: stream_rows_mr<3>(w, x, ldx, y, r0, r1); break;
    default: stream_rows_mr<4>(w, x, ldx, y, r0, r1); break;
  }
}
#else
constexpr bool kHasStream = false;

void stream_rows(const QWeight&, const float*, int64_t, int64_t, float*, int64_t, int64_t) {}
#endif

bool streams(int64_t m) { return kHasStream && m <= kStreamRows; }

// Weight rows [r0, r1) against every row of x, by whichever path m calls for.
void multiply_rows(const QWeight& w, const float* x, int64_t ldx, int64_t m, float* y, int64_t r0, int64_t r1) {
  if (streams(m)) {
    stream_rows(w, x, ldx, m, y, r0, r1);
  } else {
    panel_rows(w, x, ldx, m, y, r0, r1);
  }
}

// y [m, N] = x @ Wᵀ; x's rows are ldx floats apart, zero-padded to whole vectors unless streams(m).
//
// Threads claim blocks of W's rows from a shared counter, a few claims' worth each, rather than a fixed share: on a
// machine shared with other work a thread may start late or be preempted, and the others then take over its rows,
// so the call costs that thread's absence rather than its absence plus its whole share done after it returns.
void matmul(const QWeight& w, const float* x, int64_t ldx, int64_t m, float* y) {
  const int64_t blocks = (w.n + kSplit - 1) / kSplit;
  const int64_t work = blocks * kSplit * w.k * m;
  const int64_t threads = std::clamp<int64_t>(work / kMinWorkPerThread, 1, at::get_num_threads());
  if (threads == 1) {
    multiply_rows(w, x, ldx, m, y, 0, w.n);
    return;
  }
  const int64_t per_claim = std::max<int64_t>(1, blocks / (threads * kClaimsPerThread));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t b0; (b0 = next.fetch_add(per_claim, std::memory_order_relaxed)) < blocks;)
      multiply_rows(w, x, ldx, m, y, b0 * kSplit, std::min((b0 + per_claim) * kSplit, w.n));
  });
}

}  // namespace

// x [M, K] (rows contiguous; any floating dtype: computed in float32) @ W [N, K]ᵀ -> [M, N] in x's dtype. W: qweight
// uint8 [N, K / 2] (bits 4) or int8 [N, K] (bits 8), scale float16 [N, K / group_size], offset like scale or None.
torch::Tensor quantized_matmul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scale,
                               c10::optional<torch::Tensor> offset, int64_t bits, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2, "x and qweight must be 2-D");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
  TORCH_CHECK(qweight.scalar_type() == (bits == 4 ? at::kByte : at::kChar), "qweight must be ",
              bits == 4 ? "uint8" : "int8", " for ", bits, " bits");
  const int64_t m = x.size(0), n = qweight.size(0), k = qweight.size(1) * (bits == 4 ? 2 : 1);
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " inputs, the weight ", k);
  TORCH_CHECK(group_size > 0 && k % group_size == 0 && (bits == 8 || group_size % kRun == 0),
              "bad group size ", group_size, " for ", k, " inputs");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.size(0) == n && scale.size(1) == k / group_size,
              "scale must be float16 [N, K / group_size]");
  TORCH_CHECK(!offset || (bits == 4 && offset->scalar_type() == at::kHalf && offset->sizes() == scale.sizes()),
              "offset must be float16 like scale, and only with 4 bits");
  torch::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  if (xf.stride(1) != 1) xf = xf.contiguous();
  // The panel path reads x in whole vectors (only an int8 weight with one scale per row has K % 16 != 0).
  if (k % kLanes != 0 && !streams(m)) xf = at::constant_pad_nd(xf, {0, round_up(k, kLanes) - k});
  const auto q = qweight.contiguous(), s = scale.contiguous();
  const torch::Tensor o = offset ? offset->contiguous() : torch::Tensor();
  torch::Tensor y = torch::empty({m, n}, xf.options());
  if (m > 0 && n > 0) {
    const QWeight w{static_cast<const uint8_t*>(q.data_ptr()), s.data_ptr<at::Half>(),
                    o.defined() ? o.data_ptr<at::Half>() : nullptr, n, k, group_size, bits};
    matmul(w, xf.data_ptr<float>(), xf.stride(0), m, y.data_ptr<float>());
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantized_matmul", &quantized_matmul, "x @ W^T for QuantizedLinear's integer weights", py::arg("x"),
        py::arg("qweight"), py::arg("scale"), py::arg("offset"), py::arg("bits"), py::arg("group_size"),
        py::call_guard<py::gil_scoped_release>());
}
