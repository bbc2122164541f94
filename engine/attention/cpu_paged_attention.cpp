// Decode attention on the CPU that reads the paged KV cache in place (engine/attention/cpu_kernels.py builds it).
//
// One task per request: the scores of every query head against every cached position (GQA: H / KVH query heads
// share a KV head), a softmax, and the weighted sum of the values. Each position's key and value rows (all KV heads,
// contiguous) are read once, from their block, where the portable path first copies every request's blocks into
// one padded tensor.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

template <typename scalar_t>
static void decode(const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache, const int32_t* tables,
                   const int32_t* lens, scalar_t* out, int64_t num_rows, int64_t heads, int64_t kv_heads,
                   int64_t dim, int64_t block_size, int64_t width, float scale, int64_t window) {
  const int64_t group = heads / kv_heads;
  const int64_t row_stride = kv_heads * dim, block_stride = block_size * kv_heads * dim;
  at::parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(heads * dim), acc(heads * dim), scores, sums(heads);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t context = lens[row];
      scalar_t* dst = out + row * heads * dim;
      if (context <= 0) {  // a padded row
        std::fill(dst, dst + heads * dim, scalar_t(0));
        continue;
      }
      const int64_t first = window > 0 ? std::max<int64_t>(0, context - window) : 0, n = context - first;
      const scalar_t* src = q + row * heads * dim;
      for (int64_t i = 0; i < heads * dim; ++i) query[i] = static_cast<float>(src[i]) * scale;
      scores.resize(heads * n);
      const int32_t* table = tables + row * width;
      // Keys: a position's row holds every KV head (contiguous), read once for all the query heads.
      for (int64_t p = first; p < context; ++p) {
        const scalar_t* key = k_cache + table[p / block_size] * block_stride + (p % block_size) * row_stride;
        for (int64_t h = 0; h < heads; ++h) {
          const float* qh = query.data() + h * dim;
          const scalar_t* kh = key + (h / group) * dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < dim; ++d) dot += qh[d] * static_cast<float>(kh[d]);
          scores[h * n + p - first] = dot;
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        float* s = scores.data() + h * n;
        const float top = *std::max_element(s, s + n);
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) {
          s[j] = std::exp(s[j] - top);
          sum += s[j];
        }
        sums[h] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = first; p < context; ++p) {
        const scalar_t* value = v_cache + table[p / block_size] * block_stride + (p % block_size) * row_stride;
        for (int64_t h = 0; h < heads; ++h) {
          const float w = scores[h * n + p - first];
          const scalar_t* vh = value + (h / group) * dim;
          float* a = acc.data() + h * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) a[d] += w * static_cast<float>(vh[d]);
        }
      }
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t d = 0; d < dim; ++d) dst[h * dim + d] = static_cast<scalar_t>(acc[h * dim + d] / sums[h]);
    }
  });
}

// q [rows, heads, dim]; caches [blocks, block_size, kv_heads, dim] (contiguous); tables [rows, width] and
// lens [rows] int32; window <= 0: none. Returns [rows, heads, dim].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor tables, torch::Tensor lens, double scale, int64_t window) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the KV cache must be contiguous");
  TORCH_CHECK(tables.scalar_type() == at::kInt && lens.scalar_type() == at::kInt, "tables and lens must be int32");
  auto query = q.contiguous();
  auto table = tables.contiguous();
  auto out = torch::empty_like(query);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode_attention", [&] {
    decode<scalar_t>(query.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                     table.data_ptr<int32_t>(), lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), query.size(0),
                     query.size(1), k_cache.size(2), query.size(2), k_cache.size(1), table.size(1),
                     static_cast<float>(scale), window);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV cache");
}
