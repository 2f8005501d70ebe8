// Shared pieces of the CUDA glue (csrc/cuda/*.cu): torch dtype -> CUDA dtype, raw pointers, the
// current stream. Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls in
// cuBLAS/cuSPARSE headers), so the glue also compiles against a CPU build's headers for a check.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

}  // namespace glue
}  // namespace cda2
