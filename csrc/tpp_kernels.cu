// CUDA kernels of the tpp_cuda ops (contracts in tpp_ops.h; the host side and the GEMMs are in tpp_ops.cpp).
//
// Every kernel covers many layers in one launch: the per-layer arguments travel by value in a Launch struct
// (kernel parameter space, read in place through __grid_constant__), with the first block of each layer;
// a block finds its layer by binary search. Elementwise kernels give each block 1024 consecutive elements of
// one layer; reductions give each block one kReduceChunk of one layer and write one partial (fixed-order
// warp-shuffle + shared-memory tree: deterministic, no atomics). Needs sm_70+ (__grid_constant__).
#include "tpp_ops.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace tpp {
namespace {

constexpr int kThreads = 256;
constexpr int kElementsPerThread = 4;
constexpr int64_t kElementsPerBlock = kThreads * kElementsPerThread;
static_assert(kReduceChunk % kThreads == 0, "a reduction chunk is a whole number of block strides");

constexpr size_t kParamBytes = 4096;  // the portable kernel parameter limit

template <typename Layer>
struct Launch {
  static constexpr int kMaxLayers = static_cast<int>((kParamBytes - 64) / (sizeof(Layer) + sizeof(int64_t)));
  Layer layers[kMaxLayers];
  int64_t block_start[kMaxLayers + 1];  // layer l owns blocks [block_start[l], block_start[l + 1])
  int n;
};

// The layer owning block b: the last l with block_start[l] <= b (layers with no block are skipped).
template <typename Layer>
__device__ int layer_of(const Launch<Layer>& args, int64_t b) {
  int lo = 0, hi = args.n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (args.block_start[mid] <= b) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Calls launch(args, grid) for groups of consecutive `layers`, as many per launch as fit in the parameters.
template <typename Layer, typename BlocksOf, typename LaunchFn>
void for_each_launch(const std::vector<Layer>& layers, BlocksOf blocks_of, LaunchFn launch) {
  Launch<Layer> args;
  static_assert(sizeof(args) <= kParamBytes, "kernel arguments exceed the parameter space");
  int64_t blocks = 0;
  args.n = 0;
  auto flush = [&] {
    if (blocks > 0) {
      launch(args, dim3(static_cast<unsigned>(blocks)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    args.n = 0;
    blocks = 0;
  };
  for (const Layer& layer : layers) {
    args.layers[args.n] = layer;
    args.block_start[args.n] = blocks;
    blocks += blocks_of(layer);
    args.block_start[++args.n] = blocks;
    if (args.n == Launch<Layer>::kMaxLayers) flush();
  }
  flush();
}

cudaStream_t stream() {
  return c10::cuda::getCurrentCUDAStream();
}

__device__ int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

int64_t element_blocks(int64_t elements) {
  return (elements + kElementsPerBlock - 1) / kElementsPerBlock;
}

template <typename F>
void dispatch_dtype(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float: f(float{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "tpp_cuda: unsupported dtype ", dtype);
  }
}

// Sum of `v` over the block, valid in thread 0 (blockDim.x = kThreads, a multiple of 32).
__device__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0f;
  if (threadIdx.x < 32) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

// ------------------------------------------------------------------------------------------------------------
// Kernels
// ------------------------------------------------------------------------------------------------------------

// One block per layer: pos = -1, then pos[P_a] = a. Out-of-range or repeated indices trip a device assert.
__global__ void positions_kernel(const __grid_constant__ Launch<PositionsLayer> args) {
  const PositionsLayer& y = args.layers[layer_of(args, blockIdx.x)];
  for (int64_t i = threadIdx.x; i < y.n; i += blockDim.x) y.pos[i] = -1;
  __syncthreads();
  for (int64_t a = threadIdx.x; a < y.p; a += blockDim.x) {
    const int64_t i = y.idx[a];
    CUDA_KERNEL_ASSERT(i >= 0 && i < y.n && "pruned index out of range");
    const int32_t previous = atomicExch(y.pos + i, static_cast<int32_t>(a));
    CUDA_KERNEL_ASSERT(previous == -1 && "pruned indices must be distinct");
  }
}

// out_p[a, c] = W[P_a, c], then out_all[i, c] = W[i, c] if out_all is set; in fp32.
template <typename T>
__global__ void gather_kernel(const __grid_constant__ Launch<GatherLayer> args) {
  const int l = layer_of(args, blockIdx.x);
  const GatherLayer& y = args.layers[l];
  const T* w = static_cast<const T*>(y.w);
  const int64_t pruned = y.p * y.d, total = pruned + (y.out_all ? y.n * y.d : 0);
  const int64_t base = (blockIdx.x - args.block_start[l]) * kElementsPerBlock + threadIdx.x;
#pragma unroll
  for (int k = 0; k < kElementsPerThread; ++k) {
    const int64_t e = base + k * kThreads;
    if (e < pruned) {
      const int64_t a = e / y.d;
      y.out_p[e] = static_cast<float>(w[y.idx[a] * y.d + (e - a * y.d)]);
    } else if (e < total) {
      y.out_all[e - pruned] = static_cast<float>(w[e - pruned]);
    }
  }
}

// partials[chunk] = scale · Σ_{e in chunk} (1 + m_{e mod N}) R_e².
__global__ void gram_loss_kernel(const __grid_constant__ Launch<GramLossLayer> args) {
  const int l = layer_of(args, blockIdx.x);
  const GramLossLayer& y = args.layers[l];
  const int64_t chunk = blockIdx.x - args.block_start[l];
  const int64_t end = min64(y.p * y.n, (chunk + 1) * kReduceChunk);
  float acc = 0.0f;
  for (int64_t e = chunk * kReduceChunk + threadIdx.x; e < end; e += kThreads) {
    const float r = y.r[e];
    acc += (y.pos[e % y.n] < 0 ? 2.0f : 1.0f) * r * r;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) y.partials[chunk] = y.scale * acc;
}

// out[i, c] (= or +=) factor·g·(i = P_a ? rows_p[a, c] : rows_k[i, c]); 0 for p = 0.
template <typename T, bool kAccumulate>
__global__ void gram_grad_kernel(const __grid_constant__ Launch<GramGradLayer> args, const float* scale_ptr) {
  const int l = layer_of(args, blockIdx.x);
  const GramGradLayer& y = args.layers[l];
  T* out = static_cast<T*>(y.out);
  const float f = y.factor * (scale_ptr ? *scale_ptr : 1.0f);
  const int64_t total = y.n * y.d;
  const int64_t base = (blockIdx.x - args.block_start[l]) * kElementsPerBlock + threadIdx.x;
#pragma unroll
  for (int k = 0; k < kElementsPerThread; ++k) {
    const int64_t e = base + k * kThreads;
    if (e < total) {
      float v = 0.0f;
      if (y.p > 0) {
        const int64_t i = e / y.d;
        const int32_t a = y.pos[i];
        v = f * (a >= 0 ? y.rows_p[a * y.d + (e - i * y.d)] : y.rows_k[e]);
      }
      out[e] = static_cast<T>(kAccumulate ? static_cast<float>(out[e]) + v : v);
    }
  }
}

// partials[chunk] = Σ_{a in chunk} v[P_a]².
template <typename T>
__global__ void bn_loss_kernel(const __grid_constant__ Launch<BnLossLayer> args) {
  const int l = layer_of(args, blockIdx.x);
  const BnLossLayer& y = args.layers[l];
  const T* v = static_cast<const T*>(y.v);
  const int64_t chunk = blockIdx.x - args.block_start[l];
  const int64_t end = min64(y.p, (chunk + 1) * kReduceChunk);
  float acc = 0.0f;
  for (int64_t a = chunk * kReduceChunk + threadIdx.x; a < end; a += kThreads) {
    const int64_t j = y.idx[a];
    CUDA_KERNEL_ASSERT(j >= 0 && j < y.c && "pruned index out of range");
    const float x = static_cast<float>(v[j]);
    acc += x * x;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) y.partials[chunk] = acc;
}

// One block per vector: out = 0 (unless accumulating), then out[P_a] += 2·scale·g·v[P_a].
template <typename T, bool kAccumulate>
__global__ void bn_grad_kernel(const __grid_constant__ Launch<BnGradLayer> args, float scale,
                               const float* scale_ptr) {
  const BnGradLayer& y = args.layers[layer_of(args, blockIdx.x)];
  const T* v = static_cast<const T*>(y.v);
  T* out = static_cast<T*>(y.out);
  const float f = 2.0f * scale * (scale_ptr ? *scale_ptr : 1.0f);
  if (!kAccumulate) {
    for (int64_t j = threadIdx.x; j < y.c; j += kThreads) out[j] = static_cast<T>(0.0f);
    __syncthreads();
  }
  for (int64_t a = threadIdx.x; a < y.p; a += kThreads) {
    const int64_t j = y.idx[a];
    CUDA_KERNEL_ASSERT(j >= 0 && j < y.c && "pruned index out of range");
    out[j] = static_cast<T>(static_cast<float>(out[j]) + f * static_cast<float>(v[j]));
  }
}

// out[0] = Σ partials, one block, fixed order.
__global__ void sum_kernel(const float* partials, int64_t n, float* out) {
  float acc = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) acc += partials[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out = acc;
}

// ------------------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------------------

void positions(const std::vector<PositionsLayer>& layers) {
  for_each_launch(layers, [](const PositionsLayer&) { return int64_t{1}; },
                  [](const Launch<PositionsLayer>& args, dim3 grid) {
                    positions_kernel<<<grid, kThreads, 0, stream()>>>(args);
                  });
}

void gather(const std::vector<GatherLayer>& layers, c10::ScalarType dtype) {
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    for_each_launch(layers,
                    [](const GatherLayer& y) { return element_blocks((y.p + (y.out_all ? y.n : 0)) * y.d); },
                    [](const Launch<GatherLayer>& args, dim3 grid) {
                      gather_kernel<T><<<grid, kThreads, 0, stream()>>>(args);
                    });
  });
}

void gram_loss(const std::vector<GramLossLayer>& layers) {
  for_each_launch(layers, [](const GramLossLayer& y) { return reduce_chunks(y.p * y.n); },
                  [](const Launch<GramLossLayer>& args, dim3 grid) {
                    gram_loss_kernel<<<grid, kThreads, 0, stream()>>>(args);
                  });
}

void gram_grad(const std::vector<GramGradLayer>& layers, c10::ScalarType dtype, const float* scale_ptr,
               bool accumulate) {
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    for_each_launch(layers, [](const GramGradLayer& y) { return element_blocks(y.n * y.d); },
                    [&](const Launch<GramGradLayer>& args, dim3 grid) {
                      if (accumulate) {
                        gram_grad_kernel<T, true><<<grid, kThreads, 0, stream()>>>(args, scale_ptr);
                      } else {
                        gram_grad_kernel<T, false><<<grid, kThreads, 0, stream()>>>(args, scale_ptr);
                      }
                    });
  });
}

void bn_loss(const std::vector<BnLossLayer>& layers, c10::ScalarType dtype) {
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    for_each_launch(layers, [](const BnLossLayer& y) { return reduce_chunks(y.p); },
                    [](const Launch<BnLossLayer>& args, dim3 grid) {
                      bn_loss_kernel<T><<<grid, kThreads, 0, stream()>>>(args);
                    });
  });
}

void bn_grad(const std::vector<BnGradLayer>& layers, c10::ScalarType dtype, float scale, const float* scale_ptr,
             bool accumulate) {
  dispatch_dtype(dtype, [&](auto zero) {
    using T = decltype(zero);
    for_each_launch(layers, [](const BnGradLayer&) { return int64_t{1}; },
                    [&](const Launch<BnGradLayer>& args, dim3 grid) {
                      if (accumulate) {
                        bn_grad_kernel<T, true><<<grid, kThreads, 0, stream()>>>(args, scale, scale_ptr);
                      } else {
                        bn_grad_kernel<T, false><<<grid, kThreads, 0, stream()>>>(args, scale, scale_ptr);
                      }
                    });
  });
}

void sum(const float* partials, int64_t n, float* out) {
  sum_kernel<<<1, kThreads, 0, stream()>>>(partials, n, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

const Kernels& cuda_kernels() {
  static const Kernels kernels{positions, gather, gram_loss, gram_grad, bn_loss, bn_grad, sum};
  return kernels;
}

}  // namespace tpp
