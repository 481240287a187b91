// privatekeras secure kernels for TensorFlow.
//
// Randomness: seeds come from the OS entropy pool (libsodium's randombytes_buf,
// which uses getrandom(2)); every random tensor is the ChaCha20 (RFC 8439, IETF
// variant, all-zero nonce, block counter from 0) keystream under a 256-bit seed,
// mapped to [minval, maxval) by rejection sampling so that it is exactly uniform.
//
// Bit ops: the local, share-wise bit manipulations ABY3 needs for its boolean
// circuits (bit gathering, bit reversal, xor of set-bit indices).
//
// Built against the installed TensorFlow by privatekeras.kernels.build().

#include <sodium.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor_shape.h"

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

namespace {

constexpr int kSeedWords = 8;  // 8 x int32 = 256-bit ChaCha20 key
constexpr size_t kChunkBytes = 1 << 16;

bool EnsureSodium() {
  static const bool ok = sodium_init() >= 0;
  return ok;
}

// Sequential reader over a ChaCha20 keystream: key = seed, nonce = 0,
// block counter starting at 0, produced in chunks.
class KeystreamReader {
 public:
  explicit KeystreamReader(const unsigned char key[crypto_stream_chacha20_ietf_KEYBYTES])
      : buffer_(kChunkBytes), pos_(kChunkBytes) {
    std::memcpy(key_, key, sizeof(key_));
    std::memset(nonce_, 0, sizeof(nonce_));
  }
  ~KeystreamReader() { sodium_memzero(key_, sizeof(key_)); }

  template <typename W>
  W Next() {
    if (pos_ + sizeof(W) > buffer_.size()) Refill();
    W w;
    std::memcpy(&w, buffer_.data() + pos_, sizeof(W));  // little-endian words
    pos_ += sizeof(W);
    return w;
  }

 private:
  void Refill() {
    std::memset(buffer_.data(), 0, buffer_.size());
    crypto_stream_chacha20_ietf_xor_ic(buffer_.data(), buffer_.data(), buffer_.size(),
                                       nonce_, counter_, key_);
    counter_ += static_cast<uint32_t>(buffer_.size() / 64);
    pos_ = 0;
  }

  unsigned char key_[crypto_stream_chacha20_ietf_KEYBYTES];
  unsigned char nonce_[crypto_stream_chacha20_ietf_NONCEBYTES];
  uint32_t counter_ = 0;
  std::vector<unsigned char> buffer_;
  size_t pos_;
};

// Fills out[0..n) with values uniform in [minval, maxval) drawn from the stream.
template <typename T>
void FillUniform(KeystreamReader* stream, T minval, T maxval, T* out, int64_t n) {
  // Words of 32 bits for types up to 32 bits, 64 bits for int64.
  using W = typename std::conditional<sizeof(T) <= 4, uint32_t, uint64_t>::type;
  using U = typename std::make_unsigned<T>::type;
  // Cast the difference back to U: for int8/int16 the subtraction is done in int.
  const W range = static_cast<W>(static_cast<U>(static_cast<U>(maxval) - static_cast<U>(minval)));
  // 2^bits mod range, computed without overflow; accept w < 2^bits - rem, so
  // that every residue class mod range is hit equally often.
  const W rem = static_cast<W>(static_cast<W>(0) - range) % range;
  const W accept_below = static_cast<W>(static_cast<W>(0) - rem);
  const bool accept_all = (rem == 0);
  for (int64_t i = 0; i < n; ++i) {
    W w;
    do {
      w = stream->template Next<W>();
    } while (!accept_all && w >= accept_below);
    out[i] = static_cast<T>(static_cast<U>(static_cast<U>(minval) + static_cast<U>(w % range)));
  }
}

Status ReadShape(OpKernelContext* ctx, const Tensor& shape_t, TensorShape* shape) {
  if (shape_t.dtype() == tensorflow::DT_INT32) {
    return tensorflow::TensorShapeUtils::MakeShape(shape_t.vec<int32_t>(), shape);
  }
  return tensorflow::TensorShapeUtils::MakeShape(shape_t.vec<int64_t>(), shape);
}

template <typename T>
Status CheckBounds(const Tensor& minval_t, const Tensor& maxval_t, T* minval, T* maxval) {
  if (!tensorflow::TensorShapeUtils::IsScalar(minval_t.shape()) ||
      !tensorflow::TensorShapeUtils::IsScalar(maxval_t.shape())) {
    return tensorflow::errors::InvalidArgument("minval and maxval must be scalars");
  }
  *minval = minval_t.scalar<T>()();
  *maxval = maxval_t.scalar<T>()();
  if (!(*minval < *maxval)) {
    return tensorflow::errors::InvalidArgument("need minval < maxval, got ", *minval, " >= ",
                                               *maxval);
  }
  return Status();
}

// ----------------------------------------------------------------------------
// PkSecureSeed: a fresh 256-bit seed from OS entropy.

class PkSecureSeedOp : public OpKernel {
 public:
  explicit PkSecureSeedOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES(ctx, EnsureSodium(), tensorflow::errors::Internal("sodium_init failed"));
  }
  void Compute(OpKernelContext* ctx) override {
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({kSeedWords}), &out));
    randombytes_buf(out->flat<int32_t>().data(), kSeedWords * sizeof(int32_t));
  }
};

// ----------------------------------------------------------------------------
// PkSeededRandomUniform: deterministic in the seed; PkRandomUniform: fresh seed.

template <typename T, bool kSeeded>
class PkRandomUniformOp : public OpKernel {
 public:
  explicit PkRandomUniformOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES(ctx, EnsureSodium(), tensorflow::errors::Internal("sodium_init failed"));
  }

  void Compute(OpKernelContext* ctx) override {
    int arg = 0;
    const Tensor& shape_t = ctx->input(arg++);
    OP_REQUIRES(ctx, tensorflow::TensorShapeUtils::IsVector(shape_t.shape()),
                tensorflow::errors::InvalidArgument("shape must be a vector"));
    TensorShape shape;
    OP_REQUIRES_OK(ctx, ReadShape(ctx, shape_t, &shape));

    unsigned char key[crypto_stream_chacha20_ietf_KEYBYTES];
    if (kSeeded) {
      const Tensor& seed_t = ctx->input(arg++);
      OP_REQUIRES(ctx, seed_t.NumElements() == kSeedWords,
                  tensorflow::errors::InvalidArgument("seed must hold 8 int32 values, got ",
                                                      seed_t.NumElements()));
      std::memcpy(key, seed_t.flat<int32_t>().data(), sizeof(key));
    } else {
      randombytes_buf(key, sizeof(key));
    }
    const Tensor& minval_t = ctx->input(arg++);
    const Tensor& maxval_t = ctx->input(arg++);
    T minval, maxval;
    OP_REQUIRES_OK(ctx, CheckBounds<T>(minval_t, maxval_t, &minval, &maxval));

    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &out));
    KeystreamReader stream(key);
    sodium_memzero(key, sizeof(key));
    FillUniform<T>(&stream, minval, maxval, out->flat<T>().data(), out->NumElements());
  }
};

// ----------------------------------------------------------------------------
// PkChaCha20Keystream: raw keystream bytes, to check against RFC 8439 vectors.

class PkChaCha20KeystreamOp : public OpKernel {
 public:
  explicit PkChaCha20KeystreamOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES(ctx, EnsureSodium(), tensorflow::errors::Internal("sodium_init failed"));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& key_t = ctx->input(0);
    const Tensor& nonce_t = ctx->input(1);
    const Tensor& counter_t = ctx->input(2);
    const Tensor& nblocks_t = ctx->input(3);
    OP_REQUIRES(ctx, key_t.NumElements() == 32,
                tensorflow::errors::InvalidArgument("key must hold 32 bytes"));
    OP_REQUIRES(ctx, nonce_t.NumElements() == 12,
                tensorflow::errors::InvalidArgument("nonce must hold 12 bytes"));
    const int64_t nblocks = nblocks_t.scalar<int64_t>()();
    OP_REQUIRES(ctx, nblocks >= 0 && nblocks <= (1 << 20),
                tensorflow::errors::InvalidArgument("num_blocks out of range"));
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({nblocks * 64}), &out));
    unsigned char* buf = out->flat<uint8_t>().data();
    std::memset(buf, 0, nblocks * 64);
    crypto_stream_chacha20_ietf_xor_ic(buf, buf, nblocks * 64, nonce_t.flat<uint8_t>().data(),
                                       static_cast<uint32_t>(counter_t.scalar<int64_t>()()),
                                       key_t.flat<uint8_t>().data());
  }
};

// ----------------------------------------------------------------------------
// Bit ops on the two's-complement bit pattern of int32 / int64 values.

template <typename T>
using UnsignedOf = typename std::make_unsigned<T>::type;

template <typename T>
T GatherBits(T x, int start, int stride) {
  constexpr int kBits = sizeof(T) * 8;
  const UnsignedOf<T> ux = static_cast<UnsignedOf<T>>(x);
  UnsignedOf<T> r = 0;
  int i = 0;
  for (int pos = start; pos < kBits; pos += stride, ++i) {
    r |= static_cast<UnsignedOf<T>>((ux >> pos) & 1U) << i;
  }
  return static_cast<T>(r);
}

template <typename T>
class PkBitGatherOp : public OpKernel {
 public:
  explicit PkBitGatherOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("start", &start_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("stride", &stride_));
    OP_REQUIRES(ctx, stride_ > 0 && start_ >= 0 && start_ < static_cast<int>(sizeof(T) * 8),
                tensorflow::errors::InvalidArgument("need stride > 0 and 0 <= start < bits"));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &out));
    auto in = x.flat<T>();
    auto o = out->flat<T>();
    for (int64_t i = 0; i < in.size(); ++i) o(i) = GatherBits<T>(in(i), start_, stride_);
  }

 private:
  int start_;
  int stride_;
};

template <typename T>
class PkBitSplitAndGatherOp : public OpKernel {
 public:
  explicit PkBitSplitAndGatherOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("stride", &stride_));
    OP_REQUIRES(ctx, stride_ > 0 && stride_ <= static_cast<int>(sizeof(T) * 8),
                tensorflow::errors::InvalidArgument("need 0 < stride <= bits"));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    TensorShape shape({stride_});
    shape.AppendShape(x.shape());
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &out));
    auto in = x.flat<T>();
    auto o = out->flat<T>();
    const int64_t n = in.size();
    for (int s = 0; s < stride_; ++s) {
      for (int64_t i = 0; i < n; ++i) o(s * n + i) = GatherBits<T>(in(i), s, stride_);
    }
  }

 private:
  int stride_;
};

template <typename T>
class PkBitReverseOp : public OpKernel {
 public:
  explicit PkBitReverseOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    constexpr int kBits = sizeof(T) * 8;
    const Tensor& x = ctx->input(0);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &out));
    auto in = x.flat<T>();
    auto o = out->flat<T>();
    for (int64_t i = 0; i < in.size(); ++i) {
      UnsignedOf<T> v = static_cast<UnsignedOf<T>>(in(i));
      UnsignedOf<T> r = 0;
      for (int b = 0; b < kBits; ++b) {
        r = static_cast<UnsignedOf<T>>((r << 1) | (v & 1U));
        v >>= 1;
      }
      o(i) = static_cast<T>(r);
    }
  }
};

template <typename T>
class PkXorIndicesOp : public OpKernel {
 public:
  explicit PkXorIndicesOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    constexpr int kBits = sizeof(T) * 8;
    const Tensor& x = ctx->input(0);
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &out));
    auto in = x.flat<T>();
    auto o = out->flat<T>();
    for (int64_t i = 0; i < in.size(); ++i) {
      const UnsignedOf<T> v = static_cast<UnsignedOf<T>>(in(i));
      T acc = 0;
      for (int b = 0; b < kBits; ++b) {
        if ((v >> b) & 1U) acc ^= static_cast<T>(b);
      }
      o(i) = acc;
    }
  }
};

Status RandomShapeFn(InferenceContext* c) {
  ShapeHandle out;
  TF_RETURN_IF_ERROR(c->MakeShapeFromShapeTensor(0, &out));
  c->set_output(0, out);
  return Status();
}

}  // namespace

// ----------------------------------------------------------------------------
// Registration.

REGISTER_OP("PkSecureSeed")
    .Output("seed: int32")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Vector(kSeedWords));
      return Status();
    });

REGISTER_OP("PkSeededRandomUniform")
    .Input("shape: Tshape")
    .Input("seed: int32")
    .Input("minval: dtype")
    .Input("maxval: dtype")
    .Output("output: dtype")
    .Attr("dtype: {int8, int16, int32, int64}")
    .Attr("Tshape: {int32, int64}")
    .SetShapeFn(RandomShapeFn);

REGISTER_OP("PkRandomUniform")
    .Input("shape: Tshape")
    .Input("minval: dtype")
    .Input("maxval: dtype")
    .Output("output: dtype")
    .Attr("dtype: {int8, int16, int32, int64}")
    .Attr("Tshape: {int32, int64}")
    .SetIsStateful()
    .SetShapeFn(RandomShapeFn);

REGISTER_OP("PkChacha20Keystream")
    .Input("key: uint8")
    .Input("nonce: uint8")
    .Input("counter: int64")
    .Input("num_blocks: int64")
    .Output("keystream: uint8")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Vector(InferenceContext::kUnknownDim));
      return Status();
    });

REGISTER_OP("PkBitGather")
    .Input("x: T")
    .Output("y: T")
    .Attr("T: {int8, int16, int32, int64}")
    .Attr("start: int")
    .Attr("stride: int")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      return Status();
    });

REGISTER_OP("PkBitSplitAndGather")
    .Input("x: T")
    .Output("y: T")
    .Attr("T: {int8, int16, int32, int64}")
    .Attr("stride: int")
    .SetShapeFn([](InferenceContext* c) {
      int stride;
      TF_RETURN_IF_ERROR(c->GetAttr("stride", &stride));
      ShapeHandle out;
      TF_RETURN_IF_ERROR(c->Concatenate(c->Vector(stride), c->input(0), &out));
      c->set_output(0, out);
      return Status();
    });

REGISTER_OP("PkBitReverse")
    .Input("x: T")
    .Output("y: T")
    .Attr("T: {int8, int16, int32, int64}")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      return Status();
    });

REGISTER_OP("PkXorIndices")
    .Input("x: T")
    .Output("y: T")
    .Attr("T: {int8, int16, int32, int64}")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      return Status();
    });

REGISTER_KERNEL_BUILDER(Name("PkSecureSeed").Device(DEVICE_CPU), PkSecureSeedOp);
REGISTER_KERNEL_BUILDER(Name("PkChacha20Keystream").Device(DEVICE_CPU).HostMemory("counter"),
                        PkChaCha20KeystreamOp);

#define PK_REGISTER_RANDOM(T)                                                          \
  REGISTER_KERNEL_BUILDER(                                                             \
      Name("PkSeededRandomUniform").Device(DEVICE_CPU).TypeConstraint<T>("dtype"),     \
      PkRandomUniformOp<T, true>);                                                     \
  REGISTER_KERNEL_BUILDER(Name("PkRandomUniform").Device(DEVICE_CPU).TypeConstraint<T>("dtype"), \
                          PkRandomUniformOp<T, false>);
PK_REGISTER_RANDOM(int8_t);
PK_REGISTER_RANDOM(int16_t);
PK_REGISTER_RANDOM(int32_t);
PK_REGISTER_RANDOM(int64_t);
#undef PK_REGISTER_RANDOM

#define PK_REGISTER_BITS(T)                                                                     \
  REGISTER_KERNEL_BUILDER(Name("PkBitGather").Device(DEVICE_CPU).TypeConstraint<T>("T"),        \
                          PkBitGatherOp<T>);                                                    \
  REGISTER_KERNEL_BUILDER(Name("PkBitSplitAndGather").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
                          PkBitSplitAndGatherOp<T>);                                            \
  REGISTER_KERNEL_BUILDER(Name("PkBitReverse").Device(DEVICE_CPU).TypeConstraint<T>("T"),       \
                          PkBitReverseOp<T>);                                                   \
  REGISTER_KERNEL_BUILDER(Name("PkXorIndices").Device(DEVICE_CPU).TypeConstraint<T>("T"),       \
                          PkXorIndicesOp<T>);
PK_REGISTER_BITS(int8_t);
PK_REGISTER_BITS(int16_t);
PK_REGISTER_BITS(int32_t);
PK_REGISTER_BITS(int64_t);
#undef PK_REGISTER_BITS
