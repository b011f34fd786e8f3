// CPU kernels of the FlowServe step, float32, registered as torch ops (torch.ops.deepflow.*);
// flowserve/kernels.py builds and loads them, flowserve/model.py calls them. Each has a
// plain-torch reference in flowserve/model.py, which tests/test_kernels.py compares it to:
// rope_ (apply_rope), paged_decode_attention (Llama.attention's gather path),
// add_rms_norm_ and silu_mul (Llama.add_norm and Llama.mlp without kernels).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

// Rotates, in place, the first `num_heads` heads of each row of `qkv` ([T, heads * D],
// rows may be strided: q and k are the leading columns of the fused qkv projection) by
// the angles of that row's position. Half-split (HF) layout: pairs are (i, i + D/2).
void rope_(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
           int64_t num_heads, int64_t head_dim) {
  TORCH_CHECK(qkv.dtype() == torch::kFloat && qkv.stride(1) == 1, "rope_: float32 rows");
  const int64_t T = qkv.size(0), half = head_dim / 2, row_stride = qkv.stride(0);
  float* x = qkv.data_ptr<float>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* c = cos.data_ptr<float>();  // [max_position, half], contiguous
  const float* s = sin.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* ct = c + pos[t] * half;
      const float* st = s + pos[t] * half;
      for (int64_t h = 0; h < num_heads; ++h) {
        float* a = x + t * row_stride + h * head_dim;
        float* b = a + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float ai = a[i], bi = b[i];
          a[i] = ai * ct[i] - bi * st[i];
          b[i] = bi * ct[i] + ai * st[i];
        }
      }
    }
  });
}

// Decode attention straight from the paged KV cache: one query token per sequence, its
// keys and values read in place through its block table (no gathered copy).
//   q [B, H, D] (any row stride), caches [KVH, num_blocks, block_size, D] contiguous,
//   block_tables [B, max_blocks] int64, lens [B] int64 (tokens in the cache, this one
//   included), out [B, H, D] contiguous. The H / KVH query heads of a group share K/V.
// Work is split over (sequence, KV head): each K and V row is loaded once for its group.
void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache,
                            torch::Tensor v_cache, torch::Tensor block_tables,
                            torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat && k_cache.is_contiguous() && v_cache.is_contiguous()
              && out.is_contiguous() && q.stride(2) == 1, "paged_decode_attention: layout");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k_cache.size(0), NB = k_cache.size(1), BS = k_cache.size(2);
  const int64_t G = H / KVH, MB = block_tables.size(1);
  const int64_t q_row = q.stride(0), q_head = q.stride(1);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t b = job / KVH, kvh = job % KVH, len = lp[b];
      scores.assign(G * len, 0.f);
      const float* qh = qp + b * q_row + kvh * G * q_head;
      const float* kh = kp + kvh * NB * BS * D;
      const float* vh = vp + kvh * NB * BS * D;
      std::vector<float> best(G, std::numeric_limits<float>::lowest());  // no infinities under -ffast-math
      for (int64_t t = 0; t < len; ++t) {
        const float* kt = kh + (bt[b * MB + t / BS] * BS + t % BS) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qh + g * q_head;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < D; ++i) dot += qg[i] * kt[i];
          dot *= fscale;
          scores[g * len + t] = dot;
          best[g] = std::max(best[g], dot);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * len;
        float sum = 0.f;
        const float top = best[g];
#pragma omp simd  // vectorized exp (glibc's libmvec, under -ffast-math)
        for (int64_t t = 0; t < len; ++t) sg[t] = std::exp(sg[t] - top);
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; ++t) sum += sg[t];
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; ++t) sg[t] *= inv;
      }
      float* ob = op + (b * H + kvh * G) * D;
      std::fill(ob, ob + G * D, 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const float* vt = vh + (bt[b * MB + t / BS] * BS + t % BS) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * len + t];
          float* og = ob + g * D;
#pragma omp simd
          for (int64_t i = 0; i < D; ++i) og[i] += p * vt[i];
        }
      }
    }
  });
}

// The residual stream's update and the next RMSNorm in one pass over each row:
// h += delta (in place), out = h / sqrt(mean(h^2) + eps) * weight.
void add_rms_norm_(torch::Tensor h, torch::Tensor delta, torch::Tensor weight, torch::Tensor out,
                   double eps) {
  TORCH_CHECK(h.is_contiguous() && delta.is_contiguous() && out.is_contiguous(), "add_rms_norm_: layout");
  const int64_t T = h.size(0), C = h.size(1);
  float* hp = h.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* ht = hp + t * C;
      const float* dt = dp + t * C;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < C; ++i) {
        ht[i] += dt[i];
        ss += ht[i] * ht[i];
      }
      const float r = 1.f / std::sqrt(ss / C + static_cast<float>(eps));
      float* ot = op + t * C;
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) ot[i] = ht[i] * r * wp[i];
    }
  });
}

// The gated MLP's activation: gate_up [T, 2I] (gate, then up) -> out [T, I] = silu(gate) * up.
void silu_mul(torch::Tensor out, torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && out.is_contiguous(), "silu_mul: layout");
  const int64_t T = out.size(0), I = out.size(1);
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* g = gp + t * 2 * I;
      const float* u = g + I;
      float* o = op + t * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
}

TORCH_LIBRARY(deepflow, m) {
  m.def("rope_(Tensor(a!) qkv, Tensor positions, Tensor cos, Tensor sin, int num_heads, int head_dim) -> ()");
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, "
        "Tensor block_tables, Tensor lens, float scale) -> ()");
  m.def("add_rms_norm_(Tensor(a!) h, Tensor delta, Tensor weight, Tensor(b!) out, float eps) -> ()");
  m.def("silu_mul(Tensor(a!) out, Tensor gate_up) -> ()");
}

TORCH_LIBRARY_IMPL(deepflow, CPU, m) {
  m.impl("rope_", rope_);
  m.impl("paged_decode_attention", paged_decode_attention);
  m.impl("add_rms_norm_", add_rms_norm_);
  m.impl("silu_mul", silu_mul);
}
