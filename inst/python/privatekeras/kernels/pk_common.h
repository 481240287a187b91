// privatekeras kernels: what the kernel files share (pk_ops.cc, pk_ring.cc, pk_fused.cc,
// pk_trunc.cc and pk_mesh.cc build into one library; pk_test_ops.cc into the test-only one).
//
//  - the TensorFlow names every kernel uses;
//  - u64, the ring's words (two's-complement int64 tensors read as mod-2^64 integers);
//  - ForRange: a kernel's element loop, split over TensorFlow's intra-op threads when large;
//  - RowsOf: the shape function's [rows] + the shape of an input (a kernel's stacked shares,
//    masks or messages);
//  - CheckStream: a PRF stream (int64 words of PkSeededRandomUniform) holds the words a
//    kernel is about to read, or the kernel refuses with a message naming it.

#ifndef PRIVATEKERAS_KERNELS_PK_COMMON_H_
#define PRIVATEKERAS_KERNELS_PK_COMMON_H_

#include <cstdint>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/util/work_sharder.h"

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

namespace privatekeras {

using u64 = uint64_t;

// Below this many elements a loop runs on the calling thread (splitting costs more).
constexpr int64_t kSplitAbove = 1 << 14;

// Calls f(lo, hi) over [0, n): once when n is small, else in ranges on TensorFlow's CPU
// worker threads (`cost`: TensorFlow's estimate of cycles per element, for the split).
template <typename F>
void ForRange(OpKernelContext* ctx, int64_t n, int64_t cost, F f) {
  const auto* threads = ctx->device()->tensorflow_cpu_worker_threads();
  if (n < kSplitAbove || threads == nullptr) {
    f(0, n);
    return;
  }
  tensorflow::Shard(threads->num_threads, threads->workers, n, cost, f);
}

// Sets *out to [rows] + the shape of input `input` (in a shape function).
inline Status RowsOf(InferenceContext* c, int64_t rows, int input, ShapeHandle* out) {
  return c->Concatenate(c->Vector(rows), c->input(input), out);
}

// The PRF stream `name` of op `op` is int64 and holds words [offset, offset + words).
inline Status CheckStream(const char* op, const char* name, const Tensor& f, int64_t offset,
                          int64_t words) {
  const int64_t need = offset + words;
  if (f.dtype() != tensorflow::DT_INT64 || f.NumElements() < need) {
    return tensorflow::errors::InvalidArgument(
        op, ": the PRF stream ", name, " must hold at least ", need, " int64 words (offset ",
        offset, " + ", words, "), got ", f.NumElements());
  }
  return Status();
}

}  // namespace privatekeras

#endif  // PRIVATEKERAS_KERNELS_PK_COMMON_H_
