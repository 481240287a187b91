// privatekeras test-only kernels for TensorFlow: never loaded by production code.
//
// PkChacha20Keystream(key, nonce, counter, num_blocks) returns num_blocks * 64 bytes of the
// raw ChaCha20 keystream (RFC 8439, IETF variant: 256-bit key, 96-bit nonce, 32-bit block
// counter starting at `counter`), computed by libsodium's crypto_stream_chacha20_ietf_xor_ic
// -- the same primitive the production kernels in pk_ops.cc read their randomness from.
// The tests use it to check that primitive against RFC 8439's vectors and to recompute
// PkSeededRandomUniform's output independently. An op that returns keystream under a
// caller-chosen key has no place in a worker, so it is compiled into its own library,
// pk_test_ops.so (privatekeras.kernels.build.test_library_path()), next to pk_ops.so.

#include <sodium.h>

#include <cstdint>
#include <cstring>

#include "pk_common.h"

namespace {

constexpr int64_t kBlockBytes = 64;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

class PkChacha20KeystreamOp : public OpKernel {
 public:
  explicit PkChacha20KeystreamOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES(ctx, sodium_init() >= 0, tensorflow::errors::Internal("sodium_init failed"));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& key = ctx->input(0);
    const Tensor& nonce = ctx->input(1);
    const Tensor& counter = ctx->input(2);
    const Tensor& num_blocks = ctx->input(3);
    OP_REQUIRES(ctx, key.NumElements() == crypto_stream_chacha20_ietf_KEYBYTES,
                tensorflow::errors::InvalidArgument("key must hold 32 bytes, got ",
                                                    key.NumElements()));
    OP_REQUIRES(ctx, nonce.NumElements() == crypto_stream_chacha20_ietf_NONCEBYTES,
                tensorflow::errors::InvalidArgument("nonce must hold 12 bytes, got ",
                                                    nonce.NumElements()));
    OP_REQUIRES(ctx,
                tensorflow::TensorShapeUtils::IsScalar(counter.shape()) &&
                    tensorflow::TensorShapeUtils::IsScalar(num_blocks.shape()),
                tensorflow::errors::InvalidArgument("counter and num_blocks must be scalars"));
    const int64_t first = counter.scalar<int64_t>()();
    const int64_t blocks = num_blocks.scalar<int64_t>()();
    OP_REQUIRES(ctx, blocks >= 0 && blocks <= kMaxBlocks,
                tensorflow::errors::InvalidArgument("num_blocks must be in [0, 2^20], got ",
                                                    blocks));
    // The 32-bit block counter must not wrap within the request.
    OP_REQUIRES(ctx, first >= 0 && first + blocks <= (int64_t{1} << 32),
                tensorflow::errors::InvalidArgument(
                    "counter must be in [0, 2^32 - num_blocks], got ", first));

    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({blocks * kBlockBytes}), &out));
    unsigned char* bytes = out->flat<uint8_t>().data();
    const size_t len = static_cast<size_t>(blocks * kBlockBytes);
    std::memset(bytes, 0, len);  // keystream = encryption of zeros
    crypto_stream_chacha20_ietf_xor_ic(bytes, bytes, len, nonce.flat<uint8_t>().data(),
                                       static_cast<uint32_t>(first),
                                       key.flat<uint8_t>().data());
  }
};

}  // namespace

REGISTER_OP("PkChacha20Keystream")
    .Input("key: uint8")
    .Input("nonce: uint8")
    .Input("counter: int64")
    .Input("num_blocks: int64")
    .Output("keystream: uint8")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Vector(InferenceContext::kUnknownDim));
      return tensorflow::Status();
    });

REGISTER_KERNEL_BUILDER(Name("PkChacha20Keystream").Device(tensorflow::DEVICE_CPU),
                        PkChacha20KeystreamOp);
