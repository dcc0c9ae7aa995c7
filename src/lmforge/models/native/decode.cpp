// One decoding step of lmforge's transformer (one new token per row, eval mode), in C++.
//
// The same ATen ops in the same order as TransformerModel._decode_one / _decode_layer in transformer.py
// (the reference; tests check that both give the same logits): at decoding sizes a step is a few dozen
// tiny ops, and the Python interpreter between them costs about a quarter of the step. Built on first
// use by lmforge.models.native (torch.utils.cpp_extension) and registered as torch.ops.<LMFORGE_NAMESPACE>.*,
// a name that changes with this file (two builds loaded into one process must not register the same one).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ln_1 w, b; qkv w^T, b; out w^T, b; ln_2 w, b; fc w^T, b; proj w^T, b (the Linear weights as transposed views,
// what at::linear would make of them on every call)
constexpr int64_t kParamsPerLayer = 12;

struct Options {
  int64_t n_head, n_kv_head, head_dim;
  bool rms, parallel;
  double eps;
  int64_t mlp;  // 0: GELU (exact), 1: GELU (tanh), 2: SwiGLU
};

Tensor norm(const Tensor& x, const OptTensor& w, const OptTensor& b, const Options& o) {
  const int64_t C = x.size(-1);
  if (o.rms) return at::rms_norm(x, {C}, w, o.eps);
  return std::get<0>(at::native_layer_norm(x, {C}, w, b, o.eps));  // what at::layer_norm calls
}

// at::linear for 2-D input, given the weight already transposed: the same addmm / mm
Tensor linear_t(const Tensor& x, const Tensor& w_t, const OptTensor& b) {
  return b.has_value() ? at::addmm(*b, x, w_t) : at::mm(x, w_t);
}

Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& mask, bool gqa) {
  if (!gqa && !mask.has_value() && q.device().is_cpu()) {  // the kernel at::scaled_dot_product_attention picks
    return std::get<0>(at::_scaled_dot_product_flash_attention_for_cpu(q, k, v));
  }
  return at::scaled_dot_product_attention(q, k, v, mask, 0.0, false, std::nullopt, gqa);
}

Tensor rope(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  Tensor rotated = at::cat({x.narrow(-1, half, x.size(-1) - half).neg(), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

Tensor layer(const std::vector<OptTensor>& p, int64_t i, Tensor x, const OptTensor& cos, const OptTensor& sin,
             Tensor& kv_cache, int64_t start, const OptTensor& mask, const Options& o) {
  const OptTensor* w = p.data() + i * kParamsPerLayer;
  const int64_t B = x.size(0), hd = o.head_dim, nq = o.n_head * hd, end = start + 1;
  Tensor h = norm(x, w[0], w[1], o);
  Tensor qkv = linear_t(h, *w[2], w[3]);  // (B, nq + 2 nkv hd)
  Tensor q = qkv.narrow(1, 0, nq).view({B, o.n_head, 1, hd});
  Tensor kv = qkv.narrow(1, nq, qkv.size(1) - nq).view({B, 2, o.n_kv_head, 1, hd});
  if (cos.has_value()) {
    q = rope(q, *cos, *sin);
    kv_cache.select(1, 0).narrow(2, start, 1).copy_(rope(kv.select(1, 0), *cos, *sin));
    kv_cache.select(1, 1).narrow(2, start, 1).copy_(kv.select(1, 1));
  } else {
    kv_cache.narrow(3, start, 1).copy_(kv);
  }
  Tensor k_all = kv_cache.select(1, 0).narrow(2, 0, end);
  Tensor v_all = kv_cache.select(1, 1).narrow(2, 0, end);
  Tensor y = attention(q, k_all, v_all, mask, o.n_kv_head != o.n_head);  // (B, nh, 1, hd)
  Tensor att = linear_t(y.reshape({B, nq}), *w[4], w[5]);
  if (!o.parallel) {
    x = x + att;
    h = norm(x, w[6], w[7], o);
  }
  Tensor m = linear_t(h, *w[8], w[9]);
  if (o.mlp == 2) {
    std::vector<Tensor> gate_up = m.chunk(2, -1);
    m = at::silu(gate_up[0]) * gate_up[1];
  } else {
    m = at::gelu(m, o.mlp == 1 ? "tanh" : "none");
  }
  m = linear_t(m, *w[10], w[11]);
  return o.parallel ? x + att + m : x + m;
}

// idx, pos (B,) long; returns logits (B, V). kv: per layer (B, 2, nkv, capacity, hd), written at slot start.
// head: the output projection transposed (C, V).
Tensor decode_step(const Tensor& idx, const Tensor& pos, const Tensor& wte, const OptTensor& wpe,
                   const OptTensor& rope_cos, const OptTensor& rope_sin, std::vector<OptTensor> params,
                   std::vector<Tensor> kv, int64_t start, const OptTensor& mask, const OptTensor& ln_f_w,
                   const OptTensor& ln_f_b, const Tensor& head, int64_t n_head, int64_t n_kv_head,
                   int64_t head_dim, bool rms, double eps, bool parallel, int64_t mlp) {
  TORCH_CHECK(params.size() == kv.size() * kParamsPerLayer, "decode_step: ", params.size(),
              " parameters for ", kv.size(), " layers");
  const Options o{n_head, n_kv_head, head_dim, rms, parallel, eps, mlp};
  Tensor x = at::embedding(wte, idx);  // (B, C)
  OptTensor cos, sin;
  if (wpe.has_value()) {
    x = x + at::embedding(*wpe, pos);
  } else {
    cos = rope_cos->index_select(0, pos).view({pos.size(0), 1, 1, -1}).to(x.scalar_type());
    sin = rope_sin->index_select(0, pos).view({pos.size(0), 1, 1, -1}).to(x.scalar_type());
  }
  for (int64_t i = 0; i < static_cast<int64_t>(kv.size()); ++i) {
    x = layer(params, i, x, cos, sin, kv[i], start, mask, o);
  }
  return at::mm(norm(x, ln_f_w, ln_f_b, o), head);
}

// Beam search's reorder: dst[i][:, :, :, start:end] = src[i][index][:, :, :, start:end] for every layer.
void reorder(const std::vector<Tensor>& src, std::vector<Tensor> dst, const Tensor& index, int64_t start,
             int64_t end) {
  TORCH_CHECK(src.size() == dst.size(), "reorder: ", src.size(), " source and ", dst.size(), " target buffers");
  for (size_t i = 0; i < src.size(); ++i) {
    Tensor out = dst[i].narrow(3, start, end - start);
    at::index_select_out(out, src[i].narrow(3, start, end - start), 0, index);
  }
}

}  // namespace

#ifndef LMFORGE_NAMESPACE
#define LMFORGE_NAMESPACE lmforge_native
#endif
#define LMFORGE_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)  // expands LMFORGE_NAMESPACE before TORCH_LIBRARY pastes it

LMFORGE_LIBRARY(LMFORGE_NAMESPACE, m) {
  m.def(
      "decode_step(Tensor idx, Tensor pos, Tensor wte, Tensor? wpe, Tensor? rope_cos, Tensor? rope_sin, "
      "Tensor?[] params, Tensor(a!)[] kv, int start, Tensor? mask, Tensor? ln_f_w, Tensor? ln_f_b, "
      "Tensor head, int n_head, int n_kv_head, int head_dim, bool rms, float eps, bool parallel, int mlp) "
      "-> Tensor");
  m.impl("decode_step", c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(decode_step));
  m.def("reorder(Tensor[] src, Tensor(a!)[] dst, Tensor index, int start, int end) -> ()");
  m.impl("reorder", c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(reorder));
}
