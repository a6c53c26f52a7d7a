// The routed LoRA experts of a gated (SiLU) MoE-LoRA MLP on CPU, one pass over each tile of rows.
//
// A probe (benchmarks/native_experts/probe.py), not used by the package. What it computes is
// student/fused_experts.py's (its docstring has the notation); only how differs:
// rows come in tiles of up to R rows of one expert, and for each tile every intermediate-size quantity (the
// rank-r expansions dg/du and the down-LoRA's dL/da_e, the activation, the mixed correction, the gradients of
// the pre-activations) lives in registers or in a tile buffer in cache. Only the inputs the rows gather (g, u,
// dL/dh) and the outputs (the weighted corrections, the pre-activation gradients) touch memory, where the
// autograd and compiled paths write and read back about three times as many [rows, intermediate] tensors.
// The rank-r products that reduce over the intermediate size (v = a_e A_d^T, dt = d_gg B_g^T ...) and the
// factor gradients (B_in, A_d) are accumulated from the same tile while it is in cache.
//
// Layout: rows [first, first + n) of a tile belong to expert e (tiles = [T, 3] int64: e, first, n; n <= R).
// Weight tensors: b_in [E, 2, RK, I] (gate, up; rank-first), a_down [E, RK, I]. I must be a multiple of the
// vector width.

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t R = 8;  // rows per tile: R x (gate, up) accumulators stay in the 32 vector registers

inline Vec sigmoid(const Vec& x) { return Vec(1.f) / (Vec(1.f) + x.neg().exp()); }

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// out[q] = scale * <x, rows[q]> for q < RK (rows [RK, I], x [I]), four rows of weights per pass over x.
template <int RK>
inline void reduce_rows(const float* x, const float* rows, int64_t I, float scale, float* out) {
  for (int q = 0; q < RK; q += 4) {
    Vec s0(0.f), s1(0.f), s2(0.f), s3(0.f);
    const float* r = rows + q * I;
    for (int64_t c = 0; c < I; c += Vec::size()) {
      Vec xv = Vec::loadu(x + c);
      s0 = at::vec::fmadd(xv, Vec::loadu(r + c), s0);
      s1 = at::vec::fmadd(xv, Vec::loadu(r + I + c), s1);
      s2 = at::vec::fmadd(xv, Vec::loadu(r + 2 * I + c), s2);
      s3 = at::vec::fmadd(xv, Vec::loadu(r + 3 * I + c), s3);
    }
    out[q] = scale * hsum(s0);
    out[q + 1] = scale * hsum(s1);
    out[q + 2] = scale * hsum(s2);
    out[q + 3] = scale * hsum(s3);
  }
}

// acc[i] = sum_q coef[i][q] * rows[q][c:c+16] for the tile's rows (the rank-RK expansion of one chunk).
template <int RK>
inline void expand(const float (&coef)[R][RK], const float* rows, int64_t I, int64_t c, Vec (&acc)[R]) {
  for (int64_t i = 0; i < R; ++i) acc[i] = Vec(0.f);
  for (int q = 0; q < RK; ++q) {
    Vec b = Vec::loadu(rows + q * I + c);
    for (int64_t i = 0; i < R; ++i) acc[i] = at::vec::fmadd(Vec(coef[i][q]), b, acc[i]);
  }
}

// coef[i][q] = src[(first + i) * stride + offset + q], zero past the tile's n rows.
template <int RK>
inline void load_coef(const float* src, int64_t stride, int64_t offset, int64_t first, int64_t n,
                      float (&coef)[R][RK]) {
  for (int64_t i = 0; i < R; ++i)
    for (int q = 0; q < RK; ++q) coef[i][q] = i < n ? src[(first + i) * stride + offset + q] : 0.f;
}

// Where the tile's R rows read and write: rows past its n read the first row's token and write to scratch
// (their coefficients and weight are zero), so that every loop over rows has the fixed length R.
struct TileRows {
  int64_t src[R];   // token offsets into [N, I] inputs
  int64_t dst[R];   // row offsets into [M, I] outputs, or -1 for scratch
  float w[R];
  TileRows(const int64_t* tok, const float* weight, int64_t first, int64_t n, int64_t I) {
    for (int64_t i = 0; i < R; ++i) {
      src[i] = tok[first + (i < n ? i : 0)] * I;
      dst[i] = i < n ? (first + i) * I : -1;
      w[i] = i < n ? weight[first + i] : 0.f;
    }
  }
};

template <int RK>
void forward_impl(const float* t, const float* g, const float* u, const int64_t* tok, const float* w,
                  const float* b_in, const float* a_down, const int64_t* tiles, int64_t n_tiles, int64_t I,
                  float scale, float* wdiff, float* v) {
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ae_tile(R * I), scratch(I);
    float tg[R][RK], tu[R][RK];
    Vec dg[R], du[R];
    for (int64_t ti = begin; ti < end; ++ti) {
      const int64_t e = tiles[3 * ti], first = tiles[3 * ti + 1], n = tiles[3 * ti + 2];
      const TileRows rows(tok, w, first, n, I);
      float* out[R];
      for (int64_t i = 0; i < R; ++i) out[i] = rows.dst[i] < 0 ? scratch.data() : wdiff + rows.dst[i];
      const float* bg = b_in + e * 2 * RK * I;
      const float* bu = bg + RK * I;
      load_coef<RK>(t, 2 * RK, 0, first, n, tg);
      load_coef<RK>(t, 2 * RK, RK, first, n, tu);
      for (int64_t c = 0; c < I; c += Vec::size()) {
        expand<RK>(tg, bg, I, c, dg);
        expand<RK>(tu, bu, I, c, du);
        for (int64_t i = 0; i < R; ++i) {
          const Vec gt = Vec::loadu(g + rows.src[i] + c), ut = Vec::loadu(u + rows.src[i] + c);
          const Vec gg = gt + dg[i];
          const Vec ae = gg * sigmoid(gg) * (ut + du[i]);
          // the base activation computed here as a_e is: with zero deltas the correction is exactly 0
          (Vec(rows.w[i]) * (ae - gt * sigmoid(gt) * ut)).store(out[i] + c);
          ae.store(ae_tile.data() + i * I + c);
        }
      }
      for (int64_t i = 0; i < n; ++i)
        reduce_rows<RK>(ae_tile.data() + i * I, a_down + e * RK * I, I, scale, v + (first + i) * RK);
    }
  });
}

template <int RK>
void backward_impl(const float* gh, const float* g, const float* u, const int64_t* tok, const float* w,
                   const float* t, const float* dv, const float* b_in, const float* a_down, const int64_t* tiles,
                   int64_t n_tiles, int64_t I, int64_t E, float* d_gg, float* d_uu, float* dt, float* d_w,
                   float* d_factors /* [threads, E, 3, RK, I]: B_gate, B_up, A_down */) {
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    float* own = d_factors + at::get_thread_num() * E * 3 * RK * I;
    std::vector<float> scratch(2 * I);
    float tg[R][RK], tu[R][RK], dvr[R][RK];
    constexpr int64_t V = Vec::size();
    alignas(64) float xg[R][V], xu[R][V], xa[R][V], dw[R][V];
    Vec dg[R], du[R], ex[R];
    for (int64_t ti = begin; ti < end; ++ti) {
      const int64_t e = tiles[3 * ti], first = tiles[3 * ti + 1], n = tiles[3 * ti + 2];
      const TileRows rows(tok, w, first, n, I);
      float *out_g[R], *out_u[R];
      for (int64_t i = 0; i < R; ++i) {
        out_g[i] = rows.dst[i] < 0 ? scratch.data() : d_gg + rows.dst[i];
        out_u[i] = rows.dst[i] < 0 ? scratch.data() + I : d_uu + rows.dst[i];
      }
      const float* bg = b_in + e * 2 * RK * I;
      const float* bu = bg + RK * I;
      const float* ad = a_down + e * RK * I;
      float* dbg = own + e * 3 * RK * I;
      float* dbu = dbg + RK * I;
      float* dad = dbu + RK * I;
      load_coef<RK>(t, 2 * RK, 0, first, n, tg);
      load_coef<RK>(t, 2 * RK, RK, first, n, tu);
      load_coef<RK>(dv, RK, 0, first, n, dvr);
      for (int64_t i = 0; i < R; ++i) Vec(0.f).store(dw[i]);
      for (int64_t c = 0; c < I; c += V) {
        expand<RK>(dvr, ad, I, c, ex);  // dL/da_e through the down-projection LoRA
        expand<RK>(tg, bg, I, c, dg);
        expand<RK>(tu, bu, I, c, du);
        for (int64_t i = 0; i < R; ++i) {
          const int64_t at_ = rows.src[i] + c;
          const Vec gt = Vec::loadu(g + at_), ut = Vec::loadu(u + at_), ght = Vec::loadu(gh + at_);
          const Vec gg = gt + dg[i], uu = ut + du[i];
          const Vec sig = sigmoid(gg), val = gg * sig;
          const Vec ae = val * uu;
          at::vec::fmadd(ght, ae - gt * sigmoid(gt) * ut, Vec::loadu(dw[i])).store(dw[i]);
          const Vec da = at::vec::fmadd(Vec(rows.w[i]), ght, ex[i]);
          const Vec gu = da * val, gg_ = da * uu * sig * (Vec(1.f) + gg * (Vec(1.f) - sig));
          gg_.store(out_g[i] + c);
          gu.store(out_u[i] + c);
          gg_.store(xg[i]);
          gu.store(xu[i]);
          ae.store(xa[i]);
        }
        // factor gradients of this chunk: B_gate += t_g^T d_gg, B_up += t_u^T d_uu, A_down += dv^T a_e
        for (int q = 0; q < RK; ++q) {
          Vec sg(0.f), su(0.f), sa(0.f);
          for (int64_t i = 0; i < R; ++i) {
            sg = at::vec::fmadd(Vec(tg[i][q]), Vec::loadu(xg[i]), sg);
            su = at::vec::fmadd(Vec(tu[i][q]), Vec::loadu(xu[i]), su);
            sa = at::vec::fmadd(Vec(dvr[i][q]), Vec::loadu(xa[i]), sa);
          }
          (Vec::loadu(dbg + q * I + c) + sg).store(dbg + q * I + c);
          (Vec::loadu(dbu + q * I + c) + su).store(dbu + q * I + c);
          (Vec::loadu(dad + q * I + c) + sa).store(dad + q * I + c);
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = first + i;
        reduce_rows<RK>(d_gg + row * I, bg, I, 1.f, dt + row * 2 * RK);
        reduce_rows<RK>(d_uu + row * I, bu, I, 1.f, dt + row * 2 * RK + RK);
        d_w[row] = hsum(Vec::loadu(dw[i]));
      }
    }
  });
}

void check(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu(), name, " must be a contiguous CPU tensor");
}

#define DISPATCH_RANK(rank, ...)                                           \
  switch (rank) {                                                          \
    case 4: { constexpr int RK = 4; __VA_ARGS__; break; }                  \
    case 8: { constexpr int RK = 8; __VA_ARGS__; break; }                  \
    case 16: { constexpr int RK = 16; __VA_ARGS__; break; }                \
    case 32: { constexpr int RK = 32; __VA_ARGS__; break; }                \
    default: TORCH_CHECK(false, "routed_experts: rank ", rank, " is not one of 4, 8, 16, 32"); \
  }

}  // namespace

// -> (wdiff [M, I], v [M, RK] = scale * a_e A_d^T); every row must be in a tile.
std::vector<torch::Tensor> routed_forward(torch::Tensor t, torch::Tensor g, torch::Tensor u, torch::Tensor tok,
                                          torch::Tensor w, torch::Tensor b_in, torch::Tensor a_down,
                                          torch::Tensor tiles, double scale) {
  for (auto* x : {&t, &g, &u, &tok, &w, &b_in, &a_down, &tiles}) check(*x, "every input");
  const int64_t M = t.size(0), I = g.size(1), rank = a_down.size(1);
  TORCH_CHECK(I % Vec::size() == 0, "routed_experts: intermediate size ", I, " is not a multiple of ", Vec::size());
  auto wdiff = torch::empty({M, I}, g.options());
  auto v = torch::zeros({M, rank}, g.options());
  DISPATCH_RANK(rank, forward_impl<RK>(t.data_ptr<float>(), g.data_ptr<float>(), u.data_ptr<float>(),
                                       tok.data_ptr<int64_t>(), w.data_ptr<float>(), b_in.data_ptr<float>(),
                                       a_down.data_ptr<float>(), tiles.data_ptr<int64_t>(), tiles.size(0), I,
                                       static_cast<float>(scale), wdiff.data_ptr<float>(), v.data_ptr<float>()));
  return {wdiff, v};
}

// -> (d_gg, d_uu [M, I], dt [M, 2 RK] = (d_gg B_g^T, d_uu B_u^T), d_w [M] (the mix's part),
//     d_b_in [E, 2, RK, I], d_a_down [E, RK, I]); dv = dL/dv * scale.
std::vector<torch::Tensor> routed_backward(torch::Tensor gh, torch::Tensor g, torch::Tensor u, torch::Tensor tok,
                                           torch::Tensor w, torch::Tensor t, torch::Tensor dv, torch::Tensor b_in,
                                           torch::Tensor a_down, torch::Tensor tiles) {
  for (auto* x : {&gh, &g, &u, &tok, &w, &t, &dv, &b_in, &a_down, &tiles}) check(*x, "every input");
  const int64_t M = t.size(0), I = g.size(1), E = a_down.size(0), rank = a_down.size(1);
  TORCH_CHECK(I % Vec::size() == 0, "routed_experts: intermediate size ", I, " is not a multiple of ", Vec::size());
  auto d_gg = torch::empty({M, I}, g.options());  // every row is in a tile (the Python side's layout)
  auto d_uu = torch::empty({M, I}, g.options());
  auto dt = torch::zeros({M, 2 * rank}, g.options());
  auto d_w = torch::zeros({M}, g.options());
  auto d_factors = torch::zeros({at::get_num_threads(), E, 3, rank, I}, g.options());
  DISPATCH_RANK(rank, backward_impl<RK>(gh.data_ptr<float>(), g.data_ptr<float>(), u.data_ptr<float>(),
                                        tok.data_ptr<int64_t>(), w.data_ptr<float>(), t.data_ptr<float>(),
                                        dv.data_ptr<float>(), b_in.data_ptr<float>(), a_down.data_ptr<float>(),
                                        tiles.data_ptr<int64_t>(), tiles.size(0), I, E, d_gg.data_ptr<float>(),
                                        d_uu.data_ptr<float>(), dt.data_ptr<float>(), d_w.data_ptr<float>(),
                                        d_factors.data_ptr<float>()));
  auto factors = d_factors.sum(0);  // [E, 3, RK, I]
  return {d_gg, d_uu, dt, d_w, factors.narrow(1, 0, 2).contiguous(), factors.select(1, 2).contiguous()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("routed_forward", &routed_forward, "routed gated LoRA experts, forward (tiles of one expert's rows)");
  m.def("routed_backward", &routed_backward, "routed gated LoRA experts, backward");
}
