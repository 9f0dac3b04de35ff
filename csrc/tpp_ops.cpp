// torch.ops.tpp_cuda: the TPP gram and BN penalties (tpp-method.md §2) for many layers per call.
//
// One layer: W ∈ R^{N×D} (the weight's rows in memory order), pruned rows P (|P| = p), kept rows K,
// m_j = 0 for j ∈ P else 1, R = W_P Wᵀ ∈ R^{p×N}, s = 1/N² ("mean") or 1 ("sum").
//   gram:  L = s · Σ_{a, j} (1 + m_j) R_aj²         ∂L/∂W: rows P = 4s·R W, rows K = 4s·(Rᵀ W_P)[K]
//   BN:    L = Σ_{j∈P} γ_j² + β_j²                  ∂L/∂γ_j = 2γ_j for j ∈ P, 0 for j ∈ K (β alike)
//
// The host code below is shared by both devices: it checks the arguments, allocates the fp32 work buffers,
// runs the GEMMs through ATen (cuBLAS on CUDA, the CPU BLAS on CPU) and hands everything else to a Kernels
// table (tpp_ops.h): the CPU loops at the end of this file, or the CUDA kernels of tpp_kernels.cu. Every stage
// covers all layers of a call in one kernel launch per weight dtype (the GEMMs: one per layer), so the CPU
// tests exercise the same buffers, offsets and tables the GPU uses.
//
// Launches per call on CUDA, L = layers with p > 0, T = weight dtypes among them (usually 1):
//   gram_penalty_fwd       1 positions + T gathers + L GEMMs + 1 loss partials + 1 sum        = L + T + 3
//   gram_penalty_bwd       1 positions + T gathers + 2L GEMMs + T' gradient writes            = 2L + T + T' + 1
//                          (T' = dtypes of all layers: p = 0 layers get their zero gradient there)
//   gram_penalty_add_grad  1 positions + T gathers + 3L GEMMs + T gradient updates            = 3L + 2T + 1
//   bn_penalty_fwd / _bwd / _add_grad: T partials + 1 sum / T' writes / T updates
// (a "launch" over more layers than fit in a kernel's parameter space, ~50, is split). Half-precision weights
// are gathered to fp32 (the gather also converts all N rows), so every GEMM is fp32 → fp32; fp32 GEMMs follow
// torch's matmul precision (torch.backends.cuda.matmul.allow_tf32 / torch.set_float32_matmul_precision).
// Reductions: one partial per chunk of entries, then one fixed-order sum: deterministic, no atomics.
// Nothing reads device memory on the host: the incoming gradient / scale tensor is read by the kernels.
// With nothing pruned, no kernel of ours runs: the loss is a zero tensor, the gradients zero tensors.
#include "tpp_ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#define TPP_STR(x) #x
#define TPP_XSTR(x) TPP_STR(x)

namespace tpp {
namespace {

using at::Tensor;
using at::TensorList;

const Kernels& cpu_kernels();

const Kernels& kernels_for(const c10::Device& device) {
  if (device.is_cuda()) {
#ifdef TPP_WITH_CUDA
    return cuda_kernels();
#else
    TORCH_CHECK(false, "tpp_cuda was built without its CUDA kernels (no nvcc at build time): rebuild it with "
                "the CUDA toolkit to use CUDA tensors");
#endif
  }
  TORCH_CHECK(device.is_cpu(), "tpp_cuda runs on CPU and CUDA tensors, got ", device);
  return cpu_kernels();
}

// ------------------------------------------------------------------------------------------------------------
// Argument checks (metadata only; index values on CPU too — on CUDA they would need a host sync, so the CUDA
// positions kernel asserts them on the device and tpp_kernels.cuda checks them once per pruned set).
// ------------------------------------------------------------------------------------------------------------

std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kDouble: return "torch.float64";
    default: return c10::toString(t);
  }
}

bool supported(c10::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

std::string item(const char* name, size_t i) {
  return std::string(name) + "[" + std::to_string(i) + "]";
}

int64_t row_size(const Tensor& t) {
  int64_t d = 1;
  for (int64_t k = 1; k < t.dim(); ++k) d *= t.size(k);
  return d;
}

// Row i of the N×D view occupies elements [i·D, (i+1)·D) from data_ptr(): contiguous or channels-last.
bool rows_dense(const Tensor& t) {
  return t.is_non_overlapping_and_dense() && (t.size(0) <= 1 || t.stride(0) == row_size(t));
}

// Same memory order element for element (strides of size-1 dims do not matter).
bool same_layout(const Tensor& a, const Tensor& b) {
  for (int64_t k = 0; k < a.dim(); ++k) {
    if (a.size(k) > 1 && a.stride(k) != b.stride(k)) return false;
  }
  return true;
}

// One layer (or one BN vector) of a call: its tensor, its pruned indices as contiguous int64, N, D, p.
struct Layer {
  Tensor w;
  Tensor idx;
  int64_t n, d, p;
};

void check_index_values(const Tensor& idx, int64_t n, const std::string& name) {
  std::vector<bool> seen(n, false);
  const int64_t* v = idx.data_ptr<int64_t>();
  for (int64_t a = 0; a < idx.numel(); ++a) {
    TORCH_CHECK_VALUE(v[a] >= 0 && v[a] < n, name, ": filter indices must lie in [0, ", n, "), got ", v[a]);
    TORCH_CHECK_VALUE(!seen[v[a]], name, ": filter indices must be distinct, got ", v[a], " twice");
    seen[v[a]] = true;
  }
}

// `tensors[i]`: a weight [N, ...] (matrix) or a BN vector [C]; `pruned[i]`: its distinct pruned indices.
std::vector<Layer> check_layers(TensorList tensors, TensorList pruned, const char* name, bool matrix) {
  TORCH_CHECK_VALUE(tensors.size() == pruned.size(), name, " and pruned_idxs must have the same length, got ",
                    tensors.size(), " and ", pruned.size());
  TORCH_CHECK_VALUE(!tensors.empty(), name, " must not be empty");
  std::vector<Layer> layers;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& w = tensors[i];
    const Tensor& idx = pruned[i];
    const std::string wn = item(name, i), pn = item("pruned_idxs", i);
    TORCH_CHECK_TYPE(supported(w.scalar_type()), wn, " must be float32, float16 or bfloat16, got ",
                     dtype_name(w.scalar_type()), " (tpp_kernels.reference handles other dtypes)");
    if (matrix) {
      TORCH_CHECK_VALUE(w.dim() >= 2, wn, " must have at least 2 dims [N, ...], got shape ", w.sizes());
    } else {
      TORCH_CHECK_VALUE(w.dim() == 1, wn, " must be 1-D, got shape ", w.sizes());
    }
    TORCH_CHECK_VALUE(w.device() == tensors[0].device(), wn, " is on ", w.device(), ", ", name, "[0] on ",
                      tensors[0].device(), " (all tensors of one call share a device)");
    TORCH_CHECK_VALUE(rows_dense(w), wn, " must be dense (contiguous or channels-last), got strides ",
                      w.strides());
    TORCH_CHECK_TYPE(c10::isIntegralType(idx.scalar_type(), /*includeBool=*/false), pn,
                     " must be an integer tensor of filter indices, got ", dtype_name(idx.scalar_type()));
    TORCH_CHECK_VALUE(idx.dim() == 1, pn, " must be a 1-D tensor of filter indices, got shape ", idx.sizes());
    TORCH_CHECK_VALUE(idx.device() == w.device(), pn, " is on ", idx.device(), ", ", wn, " on ", w.device());
    const int64_t n = w.size(0), p = idx.numel();
    TORCH_CHECK_VALUE(p <= n, pn, " has ", p, " indices for a layer of ", n, " filters");
    Tensor idx64 = idx.to(at::kLong).contiguous();
    if (idx64.is_cpu()) check_index_values(idx64, n, pn);
    layers.push_back({w, idx64, n, row_size(w), p});
  }
  return layers;
}

// The like-shaped tensors updated in place by the add_grad ops.
void check_grads(TensorList grads, const std::vector<Layer>& layers, const char* name, const char* of) {
  TORCH_CHECK_VALUE(grads.size() == layers.size(), name, " and ", of, " must have the same length, got ",
                    grads.size(), " and ", layers.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor& g = grads[i];
    const Tensor& w = layers[i].w;
    const std::string gn = item(name, i), wn = item(of, i);
    TORCH_CHECK_VALUE(g.sizes() == w.sizes(), gn, " has shape ", g.sizes(), ", ", wn, " ", w.sizes());
    TORCH_CHECK_TYPE(g.scalar_type() == w.scalar_type(), gn, " has dtype ", dtype_name(g.scalar_type()), ", ",
                     wn, " ", dtype_name(w.scalar_type()));
    TORCH_CHECK_VALUE(g.device() == w.device(), gn, " is on ", g.device(), ", ", wn, " on ", w.device());
    TORCH_CHECK_VALUE(rows_dense(g) && same_layout(g, w), gn, " must be dense with the memory layout of ", wn,
                      " (strides ", g.strides(), " vs ", w.strides(), ")");
  }
}

// The incoming gradient or the optional scale: a 0-d floating tensor on `device`, as fp32.
Tensor scalar_on(const Tensor& t, const c10::Device& device, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 0 && c10::isFloatingType(t.scalar_type()), name,
                    " must be a 0-d floating tensor, got ", dtype_name(t.scalar_type()), " of shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), ", expected ", device);
  return t.to(at::kFloat).contiguous();
}

at::TensorOptions fp32_on(const c10::Device& device) {
  return at::TensorOptions().dtype(at::kFloat).device(device);
}

template <typename T>
T* offset(const Tensor& t, int64_t elements) {
  return static_cast<T*>(t.data_ptr()) + elements;
}

// ------------------------------------------------------------------------------------------------------------
// Gram penalty
// ------------------------------------------------------------------------------------------------------------

// What the forward and the backward share for the layers with p > 0 ("active"): the positions table and their
// rows in fp32 — W_P [p, D] (gathered) and W [N, D] (the weight itself if fp32, else converted by the gather).
struct Plan {
  std::vector<size_t> active;
  std::vector<int64_t> o_pos;  // offset of each active layer in `pos`
  Tensor pos;                  // int32, Σ N over active layers
  Tensor rows;                 // fp32 gather buffer
  std::vector<Tensor> w_p, w_all;
};

Plan make_plan(const std::vector<Layer>& layers, const Kernels& kernels) {
  Plan plan;
  const c10::Device device = layers[0].w.device();
  int64_t pos_numel = 0, rows_numel = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    const Layer& y = layers[l];
    if (y.p == 0) continue;
    plan.active.push_back(l);
    plan.o_pos.push_back(pos_numel);
    pos_numel += y.n;
    rows_numel += y.p * y.d + (y.w.scalar_type() == at::kFloat ? 0 : y.n * y.d);
  }
  plan.pos = at::empty({pos_numel}, at::TensorOptions().dtype(at::kInt).device(device));
  plan.rows = at::empty({rows_numel}, fp32_on(device));

  std::vector<PositionsLayer> positions;
  std::map<c10::ScalarType, std::vector<GatherLayer>> gathers;
  int64_t o = 0;
  for (size_t a = 0; a < plan.active.size(); ++a) {
    const Layer& y = layers[plan.active[a]];
    const bool convert_all = y.w.scalar_type() != at::kFloat;
    const int64_t o_all = o + y.p * y.d;
    positions.push_back({y.idx.data_ptr<int64_t>(), offset<int32_t>(plan.pos, plan.o_pos[a]), y.n, y.p});
    gathers[y.w.scalar_type()].push_back({y.w.data_ptr(), offset<float>(plan.rows, o),
                                          convert_all ? offset<float>(plan.rows, o_all) : nullptr,
                                          y.idx.data_ptr<int64_t>(), y.n, y.d, y.p});
    plan.w_p.push_back(plan.rows.narrow(0, o, y.p * y.d).view({y.p, y.d}));
    plan.w_all.push_back(convert_all ? plan.rows.narrow(0, o_all, y.n * y.d).view({y.n, y.d})
                                     : y.w.as_strided({y.n, y.d}, {y.d, 1}));
    o = o_all + (convert_all ? y.n * y.d : 0);
  }
  if (!positions.empty()) kernels.positions(positions);
  for (const auto& [dtype, group] : gathers) kernels.gather(group, dtype);
  return plan;
}

// Offsets of every layer's R (p·N entries, row-major, consecutive) in one fp32 buffer, and its size.
std::vector<int64_t> r_offsets(const std::vector<Layer>& layers, int64_t* total) {
  std::vector<int64_t> o_r;
  int64_t o = 0;
  for (const Layer& y : layers) {
    o_r.push_back(o);
    o += y.p * y.n;
  }
  *total = o;
  return o_r;
}

Tensor r_of(const Tensor& r, const std::vector<int64_t>& o_r, const Layer& y, size_t l) {
  return r.narrow(0, o_r[l], y.p * y.n).view({y.p, y.n});
}

// R = W_P Wᵀ of every active layer (one GEMM each).
void compute_r(const std::vector<Layer>& layers, const Plan& plan, const Tensor& r,
               const std::vector<int64_t>& o_r) {
  for (size_t a = 0; a < plan.active.size(); ++a) {
    const size_t l = plan.active[a];
    Tensor out = r_of(r, o_r, layers[l], l);
    at::mm_out(out, plan.w_p[a], plan.w_all[a].t());
  }
}

double gram_scale(int64_t n, bool mean) {
  return mean ? 1.0 / (static_cast<double>(n) * static_cast<double>(n)) : 1.0;
}

// outs[l] (= or +=) scale · g · ∂L_l/∂W_l, with g = *scale_ptr (or 1): rows P from R W, rows K from Rᵀ W_P —
// two GEMMs per active layer, then one gradient launch per dtype. Unless accumulating, layers with p = 0 get 0.
// Rᵀ W_P is computed for all N rows (p²D wasted MACs on the P rows) so that no R[:, K] has to be gathered.
void gram_grads(const std::vector<Layer>& layers, const Plan& plan, const Tensor& r,
                const std::vector<int64_t>& o_r, const std::vector<Tensor>& outs, double scale,
                const Tensor& scale_tensor, bool mean, bool accumulate, const Kernels& kernels) {
  const c10::Device device = layers[0].w.device();
  int64_t k_numel = 0, p_numel = 0;
  for (size_t l : plan.active) {
    k_numel += layers[l].n * layers[l].d;
    p_numel += layers[l].p * layers[l].d;
  }
  Tensor rows_k = at::empty({k_numel}, fp32_on(device)), rows_p = at::empty({p_numel}, fp32_on(device));

  std::map<c10::ScalarType, std::vector<GramGradLayer>> groups;
  int64_t ok = 0, op = 0;
  size_t a = 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    const Layer& y = layers[l];
    const float factor = static_cast<float>(4.0 * gram_scale(y.n, mean) * scale);
    if (a < plan.active.size() && plan.active[a] == l) {
      Tensor r_l = r_of(r, o_r, y, l);
      Tensor k_l = rows_k.narrow(0, ok, y.n * y.d).view({y.n, y.d});
      Tensor p_l = rows_p.narrow(0, op, y.p * y.d).view({y.p, y.d});
      at::mm_out(k_l, r_l.t(), plan.w_p[a]);
      at::mm_out(p_l, r_l, plan.w_all[a]);
      groups[y.w.scalar_type()].push_back({outs[l].data_ptr(), k_l.data_ptr<float>(), p_l.data_ptr<float>(),
                                           offset<int32_t>(plan.pos, plan.o_pos[a]), y.n, y.d, y.p, factor});
      ok += y.n * y.d;
      op += y.p * y.d;
      ++a;
    } else if (!accumulate) {
      groups[y.w.scalar_type()].push_back({outs[l].data_ptr(), nullptr, nullptr, nullptr, y.n, y.d, 0, factor});
    }
  }
  const float* scale_ptr = scale_tensor.defined() ? scale_tensor.data_ptr<float>() : nullptr;
  for (const auto& [dtype, group] : groups) kernels.gram_grad(group, dtype, scale_ptr, accumulate);
}

std::tuple<Tensor, Tensor> gram_penalty_fwd(TensorList weights, TensorList pruned, bool mean) {
  const auto layers = check_layers(weights, pruned, "weights", /*matrix=*/true);
  const c10::Device device = layers[0].w.device();
  c10::DeviceGuard guard(device);
  int64_t r_numel = 0;
  const auto o_r = r_offsets(layers, &r_numel);
  Tensor r = at::empty({r_numel}, fp32_on(device));
  if (r_numel == 0) return {at::zeros({}, fp32_on(device)), r};

  const Kernels& kernels = kernels_for(device);
  const Plan plan = make_plan(layers, kernels);
  compute_r(layers, plan, r, o_r);

  int64_t n_partials = 0;
  for (size_t l : plan.active) n_partials += reduce_chunks(layers[l].p * layers[l].n);
  Tensor partials = at::empty({n_partials}, fp32_on(device));
  std::vector<GramLossLayer> loss_layers;
  int64_t o = 0;
  for (size_t a = 0; a < plan.active.size(); ++a) {
    const size_t l = plan.active[a];
    const Layer& y = layers[l];
    loss_layers.push_back({offset<float>(r, o_r[l]), offset<int32_t>(plan.pos, plan.o_pos[a]),
                           offset<float>(partials, o), y.n, y.p, static_cast<float>(gram_scale(y.n, mean))});
    o += reduce_chunks(y.p * y.n);
  }
  kernels.gram_loss(loss_layers);
  Tensor loss = at::empty({}, fp32_on(device));
  kernels.sum(partials.data_ptr<float>(), n_partials, loss.data_ptr<float>());
  return {loss, r};
}

std::vector<Tensor> gram_penalty_bwd(const Tensor& grad, TensorList weights, TensorList pruned, const Tensor& r,
                                     bool mean) {
  const auto layers = check_layers(weights, pruned, "weights", /*matrix=*/true);
  const c10::Device device = layers[0].w.device();
  c10::DeviceGuard guard(device);
  const Tensor g = scalar_on(grad, device, "grad");
  int64_t r_numel = 0;
  const auto o_r = r_offsets(layers, &r_numel);
  TORCH_CHECK_VALUE(r.scalar_type() == at::kFloat && r.dim() == 1 && r.numel() == r_numel && r.is_contiguous()
                        && r.device() == device,
                    "r must be the contiguous float32 R of gram_penalty_fwd (", r_numel, " elements on ", device,
                    "), got ", dtype_name(r.scalar_type()), " of shape ", r.sizes(), " on ", r.device());
  std::vector<Tensor> outs;
  for (const Layer& y : layers) outs.push_back(r_numel == 0 ? at::zeros_like(y.w) : at::empty_like(y.w));
  if (r_numel == 0) return outs;
  const Kernels& kernels = kernels_for(device);
  const Plan plan = make_plan(layers, kernels);
  gram_grads(layers, plan, r, o_r, outs, 1.0, g, mean, /*accumulate=*/false, kernels);
  return outs;
}

void gram_penalty_add_grad(TensorList weights, TensorList grads, TensorList pruned, double scale,
                           const std::optional<Tensor>& scale_tensor, bool mean) {
  const auto layers = check_layers(weights, pruned, "weights", /*matrix=*/true);
  check_grads(grads, layers, "grads", "weights");
  const c10::Device device = layers[0].w.device();
  c10::DeviceGuard guard(device);
  const Tensor s = scale_tensor.has_value() ? scalar_on(*scale_tensor, device, "scale_tensor") : Tensor();
  int64_t r_numel = 0;
  const auto o_r = r_offsets(layers, &r_numel);
  if (r_numel == 0) return;
  const Kernels& kernels = kernels_for(device);
  const Plan plan = make_plan(layers, kernels);
  Tensor r = at::empty({r_numel}, fp32_on(device));
  compute_r(layers, plan, r, o_r);
  gram_grads(layers, plan, r, o_r, grads.vec(), scale, s, mean, /*accumulate=*/true, kernels);
}

// ------------------------------------------------------------------------------------------------------------
// BN penalty: `values` are the γ and β vectors (1-D, contiguous), each with the pruned set of its layer.
// ------------------------------------------------------------------------------------------------------------

Tensor bn_penalty_fwd(TensorList values, TensorList pruned) {
  const auto layers = check_layers(values, pruned, "values", /*matrix=*/false);
  const c10::Device device = layers[0].w.device();
  c10::DeviceGuard guard(device);
  int64_t n_partials = 0;
  for (const Layer& y : layers) n_partials += reduce_chunks(y.p);
  if (n_partials == 0) return at::zeros({}, fp32_on(device));

  const Kernels& kernels = kernels_for(device);
  Tensor partials = at::empty({n_partials}, fp32_on(device));
  std::map<c10::ScalarType, std::vector<BnLossLayer>> groups;
  int64_t o = 0;
  for (const Layer& y : layers) {
    if (y.p == 0) continue;
    groups[y.w.scalar_type()].push_back({y.w.data_ptr(), y.idx.data_ptr<int64_t>(), offset<float>(partials, o),
                                         y.n, y.p});
    o += reduce_chunks(y.p);
  }
  for (const auto& [dtype, group] : groups) kernels.bn_loss(group, dtype);
  Tensor loss = at::empty({}, fp32_on(device));
  kernels.sum(partials.data_ptr<float>(), n_partials, loss.data_ptr<float>());
  return loss;
}

// outs[i] (= or +=) 2·scale·g·v[P] on the pruned channels (0 elsewhere unless accumulating).
void bn_grads(const std::vector<Layer>& layers, const std::vector<Tensor>& outs, double scale,
              const Tensor& scale_tensor, bool accumulate) {
  std::map<c10::ScalarType, std::vector<BnGradLayer>> groups;
  for (size_t i = 0; i < layers.size(); ++i) {
    const Layer& y = layers[i];
    if (accumulate && y.p == 0) continue;
    groups[y.w.scalar_type()].push_back({y.w.data_ptr(), outs[i].data_ptr(), y.idx.data_ptr<int64_t>(), y.n,
                                         y.p});
  }
  const Kernels& kernels = kernels_for(layers[0].w.device());
  const float* scale_ptr = scale_tensor.defined() ? scale_tensor.data_ptr<float>() : nullptr;
  for (const auto& [dtype, group] : groups) {
    kernels.bn_grad(group, dtype, static_cast<float>(scale), scale_ptr, accumulate);
  }
}

std::vector<Tensor> bn_penalty_bwd(const Tensor& grad, TensorList values, TensorList pruned) {
  const auto layers = check_layers(values, pruned, "values", /*matrix=*/false);
  const c10::Device device = layers[0].w.device();
  c10::DeviceGuard guard(device);
  const Tensor g = scalar_on(grad, device, "grad");
  bool any_pruned = false;
  for (const Layer& y : layers) any_pruned = any_pruned || y.p > 0;
  std::vector<Tensor> outs;
  for (const Layer& y : layers) outs.push_back(any_pruned ? at::empty_like(y.w) : at::zeros_like(y.w));
  if (any_pruned) bn_grads(layers, outs, 1.0, g, /*accumulate=*/false);
  return outs;
}

void bn_penalty_add_grad(TensorList values, TensorList grads, TensorList pruned, double scale,
                         const std::optional<Tensor>& scale_tensor) {
  const auto layers = check_layers(values, pruned, "values", /*matrix=*/false);
  check_grads(grads, layers, "grads", "values");
  const c10::Device device = layers[0].w.device();
  c10::DeviceGuard guard(device);
  const Tensor s = scale_tensor.has_value() ? scalar_on(*scale_tensor, device, "scale_tensor") : Tensor();
  bn_grads(layers, grads.vec(), scale, s, /*accumulate=*/true);
}

// Hash of the csrc/ sources this library was built from (tpp_kernels.cuda_build.source_hash()): stale-build check.
std::string source_hash() {
#ifdef TPP_SOURCE_HASH
  return TPP_XSTR(TPP_SOURCE_HASH);
#else
  return "";
#endif
}

// ------------------------------------------------------------------------------------------------------------
// CPU kernels: the same contracts as the CUDA kernels (tpp_ops.h), as loops; sums in double.
// ------------------------------------------------------------------------------------------------------------

template <typename F>
void dispatch_dtype(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "tpp_cuda: unsupported dtype ", dtype);
  }
}

void cpu_positions(const std::vector<PositionsLayer>& layers) {
  for (const auto& y : layers) {
    std::fill(y.pos, y.pos + y.n, -1);
    for (int64_t a = 0; a < y.p; ++a) y.pos[y.idx[a]] = static_cast<int32_t>(a);
  }
}

void cpu_gather(const std::vector<GatherLayer>& layers, c10::ScalarType dtype) {
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    for (const auto& y : layers) {
      const T* w = static_cast<const T*>(y.w);
      for (int64_t a = 0; a < y.p; ++a) {
        std::transform(w + y.idx[a] * y.d, w + (y.idx[a] + 1) * y.d, y.out_p + a * y.d,
                       [](T x) { return static_cast<float>(x); });
      }
      if (y.out_all) std::transform(w, w + y.n * y.d, y.out_all, [](T x) { return static_cast<float>(x); });
    }
  });
}

void cpu_gram_loss(const std::vector<GramLossLayer>& layers) {
  for (const auto& y : layers) {
    const int64_t entries = y.p * y.n;
    for (int64_t c = 0; c < reduce_chunks(entries); ++c) {
      double acc = 0;
      for (int64_t e = c * kReduceChunk; e < std::min(entries, (c + 1) * kReduceChunk); ++e) {
        const double r = y.r[e];
        acc += (y.pos[e % y.n] < 0 ? 2.0 : 1.0) * r * r;
      }
      y.partials[c] = static_cast<float>(y.scale * acc);
    }
  }
}

void cpu_gram_grad(const std::vector<GramGradLayer>& layers, c10::ScalarType dtype, const float* scale_ptr,
                   bool accumulate) {
  const float g = scale_ptr ? *scale_ptr : 1.0f;
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    for (const auto& y : layers) {
      T* out = static_cast<T*>(y.out);
      const float f = y.factor * g;
      for (int64_t i = 0; i < y.n; ++i) {
        const float* src = y.p == 0 ? nullptr : y.pos[i] >= 0 ? y.rows_p + y.pos[i] * y.d : y.rows_k + i * y.d;
        for (int64_t c = 0; c < y.d; ++c) {
          const float v = src ? f * src[c] : 0.0f;
          T& o = out[i * y.d + c];
          o = static_cast<T>(accumulate ? static_cast<float>(o) + v : v);
        }
      }
    }
  });
}

void cpu_bn_loss(const std::vector<BnLossLayer>& layers, c10::ScalarType dtype) {
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    for (const auto& y : layers) {
      const T* v = static_cast<const T*>(y.v);
      for (int64_t c = 0; c < reduce_chunks(y.p); ++c) {
        double acc = 0;
        for (int64_t a = c * kReduceChunk; a < std::min(y.p, (c + 1) * kReduceChunk); ++a) {
          const double x = static_cast<float>(v[y.idx[a]]);
          acc += x * x;
        }
        y.partials[c] = static_cast<float>(acc);
      }
    }
  });
}

void cpu_bn_grad(const std::vector<BnGradLayer>& layers, c10::ScalarType dtype, float scale,
                 const float* scale_ptr, bool accumulate) {
  const float f = 2.0f * scale * (scale_ptr ? *scale_ptr : 1.0f);
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    for (const auto& y : layers) {
      const T* v = static_cast<const T*>(y.v);
      T* out = static_cast<T*>(y.out);
      if (!accumulate) std::fill(out, out + y.c, static_cast<T>(0.0f));
      for (int64_t a = 0; a < y.p; ++a) {
        const int64_t j = y.idx[a];
        out[j] = static_cast<T>(static_cast<float>(out[j]) + f * static_cast<float>(v[j]));
      }
    }
  });
}

void cpu_sum(const float* partials, int64_t n, float* out) {
  double acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += partials[i];
  *out = static_cast<float>(acc);
}

const Kernels& cpu_kernels() {
  static const Kernels kernels{cpu_positions, cpu_gather,  cpu_gram_loss, cpu_gram_grad,
                               cpu_bn_loss,   cpu_bn_grad, cpu_sum};
  return kernels;
}

}  // namespace
}  // namespace tpp

// ------------------------------------------------------------------------------------------------------------
// Registration. Autograd and the fake (meta) kernels are registered in Python (tpp_kernels/cuda.py), where they
// handle symbolic shapes under torch.compile.
// ------------------------------------------------------------------------------------------------------------

TORCH_LIBRARY(tpp_cuda, m) {
  m.set_python_module("tpp_kernels.cuda");
  m.def("gram_penalty_fwd(Tensor[] weights, Tensor[] pruned, bool mean) -> (Tensor, Tensor)");
  m.def("gram_penalty_bwd(Tensor grad, Tensor[] weights, Tensor[] pruned, Tensor r, bool mean) -> Tensor[]");
  m.def("gram_penalty_add_grad(Tensor[] weights, Tensor(a!)[] grads, Tensor[] pruned, float scale, "
        "Tensor? scale_tensor, bool mean) -> ()");
  m.def("bn_penalty_fwd(Tensor[] values, Tensor[] pruned) -> Tensor");
  m.def("bn_penalty_bwd(Tensor grad, Tensor[] values, Tensor[] pruned) -> Tensor[]");
  m.def("bn_penalty_add_grad(Tensor[] values, Tensor(a!)[] grads, Tensor[] pruned, float scale, "
        "Tensor? scale_tensor) -> ()");
  m.def("source_hash() -> str", &tpp::source_hash);
}

#define TPP_IMPLS(m)                                           \
  m.impl("gram_penalty_fwd", &tpp::gram_penalty_fwd);          \
  m.impl("gram_penalty_bwd", &tpp::gram_penalty_bwd);          \
  m.impl("gram_penalty_add_grad", &tpp::gram_penalty_add_grad); \
  m.impl("bn_penalty_fwd", &tpp::bn_penalty_fwd);              \
  m.impl("bn_penalty_bwd", &tpp::bn_penalty_bwd);              \
  m.impl("bn_penalty_add_grad", &tpp::bn_penalty_add_grad)

TORCH_LIBRARY_IMPL(tpp_cuda, CPU, m) {
  TPP_IMPLS(m);
}

#ifdef TPP_WITH_CUDA
TORCH_LIBRARY_IMPL(tpp_cuda, CUDA, m) {
  TPP_IMPLS(m);
}
#endif
