// Device kernels of the tpp_cuda ops: the elementwise and reduction work around the GEMMs, for many layers per
// launch. tpp_ops.cpp does the host side (checks, buffers, cuBLAS/BLAS GEMMs through ATen) and holds the CPU
// versions of these kernels; tpp_kernels.cu holds the CUDA versions. This header has no ATen or CUDA types, so
// the .cu compiles against c10 alone (fast builds) and the .cpp compiles without the CUDA toolkit.
//
// Notation (tpp-method.md §2), one layer: W ∈ R^{N×D} (rows in memory order), pruned rows P (|P| = p, P_a the
// a-th), R = W_P Wᵀ ∈ R^{p×N} (fp32), m_j = 0 for j ∈ P else 1, s = 1/N² ("mean") or 1 ("sum").
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <vector>

namespace tpp {

// Positions: pos[i] = a if i = P_a, else -1 (so m_i = pos[i] < 0).
struct PositionsLayer {
  const int64_t* idx;
  int32_t* pos;
  int64_t n, p;
};

// Gather into fp32, row-major: out_p [p, D] = the rows P_0..P_{p-1} of W, and, if out_all is set, out_all [N, D] = W.
struct GatherLayer {
  const void* w;
  float* out_p;
  float* out_all;
  const int64_t* idx;
  int64_t n, d, p;
};

// Gram loss: one partial per chunk of kReduceChunk entries of R (p·N entries, row-major):
// partials[c] = scale · Σ_{entries (a, j) of chunk c} (1 + m_j) R_aj².
struct GramLossLayer {
  const float* r;
  const int32_t* pos;
  float* partials;
  int64_t n, p;
  float scale;
};

// Gram gradient: out[i, :] = factor · g · (i = P_a ? rows_p[a, :] : rows_k[i, :]), with g = *scale_ptr (1 if null),
// rows_p = R W (4RW are the P rows of ∂L/∂W) and rows_k = Rᵀ W_P (4 Rᵀ W_P are the K rows); factor = 4s·scale.
// Written in the weight dtype, or added to it (accumulate). p = 0: out = 0 (or untouched when accumulating).
struct GramGradLayer {
  void* out;
  const float* rows_k;
  const float* rows_p;
  const int32_t* pos;
  int64_t n, d, p;
  float factor;
};

// BN loss: partials[k] = Σ_{a in chunk k of P} v[P_a]², one partial per kReduceChunk pruned channels (v has c).
struct BnLossLayer {
  const void* v;
  const int64_t* idx;
  float* partials;
  int64_t c, p;
};

// BN gradient: out[P_a] = 2·scale·g·v[P_a] (added when accumulating); unless accumulating, out = 0 elsewhere.
struct BnGradLayer {
  const void* v;
  void* out;
  const int64_t* idx;
  int64_t c, p;
};

// Entries reduced into one partial (a CUDA block of 256 threads × 16 entries).
constexpr int64_t kReduceChunk = 4096;

inline int64_t reduce_chunks(int64_t entries) {
  return (entries + kReduceChunk - 1) / kReduceChunk;
}

// One implementation of every kernel per device. Each call covers a list of layers (launches are split in
// groups of layers whose arguments fit in a kernel's 4 KiB parameter space). `dtype` is the element type of
// `w`/`out`/`v` (float, half or bfloat16); `scale_ptr` is a device fp32 scalar or null.
struct Kernels {
  void (*positions)(const std::vector<PositionsLayer>&);
  void (*gather)(const std::vector<GatherLayer>&, c10::ScalarType dtype);
  void (*gram_loss)(const std::vector<GramLossLayer>&);
  void (*gram_grad)(const std::vector<GramGradLayer>&, c10::ScalarType dtype, const float* scale_ptr,
                    bool accumulate);
  void (*bn_loss)(const std::vector<BnLossLayer>&, c10::ScalarType dtype);
  void (*bn_grad)(const std::vector<BnGradLayer>&, c10::ScalarType dtype, float scale, const float* scale_ptr,
                  bool accumulate);
  // out[0] = Σ partials[0..n), summed in a fixed order (deterministic).
  void (*sum)(const float* partials, int64_t n, float* out);
};

#ifdef TPP_WITH_CUDA
const Kernels& cuda_kernels();  // tpp_kernels.cu
#endif

}  // namespace tpp
