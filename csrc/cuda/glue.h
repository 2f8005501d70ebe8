// Shared pieces of the CUDA glue (csrc/cuda/*.cu): torch dtype -> CUDA dtype, raw pointers, the
// current stream, the range check of labels and indices. Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls in
// cuBLAS/cuSPARSE headers), so the glue also compiles against a CPU build's headers for a check.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../checks.h"
#include "../torch_free/cuda_common.cuh"

namespace cda2 {
namespace glue {

// at::Half / at::BFloat16 have the bit layout of __half / __nv_bfloat16.
template <typename scalar_t>
struct CudaType {
  using type = scalar_t;
};
template <>
struct CudaType<at::Half> {
  using type = __half;
};
template <>
struct CudaType<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename scalar_t>
using cuda_t = typename CudaType<scalar_t>::type;

// Raw pointers of a tensor whose dtype the caller has dispatched on (T is its CUDA twin type).
template <typename T>
const T* cptr(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.element_size() == static_cast<int64_t>(sizeof(T)));
  return static_cast<const T*>(t.data_ptr());
}

template <typename T>
T* mptr(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.element_size() == static_cast<int64_t>(sizeof(T)));
  return static_cast<T*>(t.data_ptr());
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Entries of the contiguous int64 vector t (labels, selection indices) in [0, hi), read on the
// device: a one-block kernel and a copy of two int64s back, before any kernel uses the entries.
// The copy synchronises the stream: the price of raising ValueError (the same one as the CPU
// kernels, see check_range_result) instead of letting a kernel meet a bad entry.
inline void check_in_range_cuda(const at::Tensor& t, int64_t hi, const char* name, const char* what,
                                cudaStream_t stream) {
  const int64_t n = t.numel();
  if (n == 0) return;
  auto result = at::empty({2}, t.options());
  C10_CUDA_CHECK(gpu::launch_range_check(t.data_ptr<int64_t>(), n, hi, result.data_ptr<int64_t>(), stream));
  int64_t host[2] = {n, 0};
  C10_CUDA_CHECK(cudaMemcpyAsync(host, result.data_ptr<int64_t>(), sizeof(host), cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  check_range_result(host[0], host[1], n, hi, name, what);
}

}  // namespace glue
}  // namespace cda2
