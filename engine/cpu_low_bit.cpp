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
// (a small integer times a float16), so the fused multiply-add rounds once, where the reference's add does.
//
// AVX-512 (x86-64 -march=native on a CPU that has it) gets intrinsics; every other CPU the portable path (the panel
// path in plain loops that the compiler vectorises).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__) && \
    !defined(INFERQ_PORTABLE)
#define INFERQ_AVX512 1
#include <immintrin.h>
#endif

namespace {

// Runs of 32 inputs: byte j of a run holds input j (low nibble) and input j + 16 (high nibble).
constexpr int64_t kRun = 32;
// Floats per vector: the panel stores K in vectors of 16 (zero-padded past K).
constexpr int64_t kLanes = 16;
// Rows of x up to which weights are dequantized in registers rather than into a panel (the AVX-512 path only).
constexpr int64_t kStreamRows = 4;
constexpr int kStreamCols = 4;  // weight rows per stream tile
constexpr int kPanelRows = 4;   // rows of x per panel tile
constexpr int kPanelCols = 6;   // weight rows per panel tile: 4 x 6 accumulators + 6 weight vectors fit 32 registers
constexpr int64_t kSplit = 12;  // threads split W's rows in blocks of this (a multiple of both tiles' widths)
// The panel of dequantized rows one thread works on: about this many bytes, so that it stays in L2 while every row
// of x passes over it.
constexpr int64_t kPanelBytes = 128 * 1024;
// Multiply-adds below which a thread is not worth waking (tens of microseconds of work).
constexpr int64_t kMinWorkPerThread = 1 << 16;

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
#ifdef INFERQ_AVX512
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

void dequant_row(const QWeight& w, int64_t r, float* dst, int64_t stride) {
  const uint8_t* q = w.row(r);
  const __m512i low = _mm512_set1_epi32(0xF);
  for (int64_t g = 0; g < w.groups(); ++g) {
    float s, a;
    group_affine(w, r, g, s, a);
    const __m512 vs = _mm512_set1_ps(s), va = _mm512_set1_ps(a);
    const int64_t k0 = g * w.group, k1 = k0 + w.group;
    if (w.bits == 8) {
      // Any group size: one per row need not be a multiple of 16. Groups of 32 start on a vector; a group of
      // K is the only one, so the masked tail (zeros past K, as a = 0) is the row's end.
      for (int64_t k = k0; k < k1; k += kLanes) {
        const __m512i v = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(tail_mask(k1 - k), q + k));
        _mm512_storeu_ps(dst + k / kLanes * stride, _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), vs, va));
      }
      continue;
    }
    for (int64_t run = k0; run < k1; run += kRun) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + run / 2)));
      float* out = dst + run / kLanes * stride;
      _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low)), vs, va));
      _mm512_storeu_ps(out + stride, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), vs, va));
    }
  }
}
#else
void dequant_row(const QWeight& w, int64_t r, float* dst, int64_t stride) {
  const uint8_t* q = w.row(r);
  const auto at = [&](int64_t k) -> float& { return dst[k / kLanes * stride + k % kLanes]; };
  for (int64_t k = w.k; k < round_up(w.k, kLanes); ++k) at(k) = 0.f;
  for (int64_t g = 0; g < w.groups(); ++g) {
    float s, a;
    group_affine(w, r, g, s, a);
    const int64_t k0 = g * w.group;
    if (w.bits == 8) {
      const int8_t* src = reinterpret_cast<const int8_t*>(q);
      for (int64_t k = k0; k < k0 + w.group; ++k) at(k) = static_cast<float>(src[k]) * s + a;
      continue;
    }
    for (int64_t run = k0; run < k0 + w.group; run += kRun) {  // one run is two whole vectors
      float* lo = &at(run);
      float* hi = &at(run + kLanes);
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

// The few-rows path: NR weight rows from row r on, dequantized in registers, against MR rows of x (all of K).
template <int MR, int NR>
void stream_tile(const QWeight& w, int64_t r, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t cols) {
  __m512 acc[MR][NR];
  INFERQ_UNROLL for (int i = 0; i < MR; ++i)
    INFERQ_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi32(0xF);
  const uint8_t* rows[NR];
  INFERQ_UNROLL for (int j = 0; j < NR; ++j) rows[j] = w.row(r + j);
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
      for (int64_t k = k0; k < k1; k += kLanes) {
        const __mmask16 m = tail_mask(k1 - k);  // one scale per row: K need not be a multiple of 16
        __m512 wv[NR];
        INFERQ_UNROLL for (int j = 0; j < NR; ++j) {
          const __m512i v = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, rows[j] + k));
          wv[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(v), vs[j]);
        }
        INFERQ_UNROLL for (int i = 0; i < MR; ++i) {
          const __m512 xv = _mm512_maskz_loadu_ps(m, x + i * ldx + k);
          INFERQ_UNROLL for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
      }
      continue;
    }
    for (int64_t run = k0; run < k1; run += kRun) {
      __m512i v[NR];
      INFERQ_UNROLL for (int j = 0; j < NR; ++j)
        v[j] = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[j] + run / 2)));
      // Inputs run .. run + 15 (the low nibbles), then run + 16 .. run + 31 (the high ones).
      INFERQ_UNROLL for (int half = 0; half < 2; ++half) {
        __m512 wv[NR];
        INFERQ_UNROLL for (int j = 0; j < NR; ++j) {
          const __m512i nib = half == 0 ? _mm512_and_si512(v[j], low) : _mm512_srli_epi32(v[j], 4);
          wv[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(nib), vs[j], va[j]);
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
#else
template <int MR, int NR>
void tile(const float* a, int64_t lda, const float* b, int64_t vectors, float* c, int64_t ldc, int64_t cols) {
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR && j < cols; ++j) {
      float sum = 0.f;
      for (int64_t v = 0; v < vectors; ++v) {
        const float* av = a + i * lda + v * kLanes;
        const float* bv = b + (v * NR + j) * kLanes;
#pragma omp simd reduction(+ : sum)
        for (int64_t l = 0; l < kLanes; ++l) sum += av[l] * bv[l];
      }
      c[i * ldc + j] = sum;
    }
  }
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

#ifdef INFERQ_AVX512
constexpr bool kHasStream = true;

template <int MR>
void stream_rows_mr(const QWeight& w, const float* x, int64_t ldx, float* y, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + kStreamCols <= r1; r += kStreamCols) stream_tile<MR, kStreamCols>(w, r, x, ldx, y, w.n, kStreamCols);
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

// y [m, N] = x @ Wᵀ; x's rows are ldx floats apart, zero-padded to whole vectors unless streams(m).
void matmul(const QWeight& w, const float* x, int64_t ldx, int64_t m, float* y) {
  const int64_t blocks = (w.n + kSplit - 1) / kSplit;
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / (kSplit * w.k * m));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    const int64_t r0 = b0 * kSplit, r1 = std::min(b1 * kSplit, w.n);
    if (streams(m)) {
      stream_rows(w, x, ldx, m, y, r0, r1);
    } else {
      panel_rows(w, x, ldx, m, y, r0, r1);
    }
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
