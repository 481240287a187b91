// privatekeras secure kernels for TensorFlow.
//
// Randomness. PkSecureSeed returns 256 fresh bits from the OS entropy pool (libsodium's
// randombytes_buf, which uses getrandom(2)). Every random tensor is the ChaCha20 keystream
// (RFC 8439, IETF variant: 96-bit all-zero nonce, 32-bit block counter from 0) under a
// 256-bit key, read as little-endian words (32-bit words for int8/int16/int32 outputs,
// 64-bit words for int64) and mapped to [minval, maxval) by rejection sampling so that it is
// exactly uniform (see FillUniform).
//
//  - PkSeededRandomUniform never uses its seed as the ChaCha20 key. TF Encrypted's ABY3
//    passes seed = pairwise key + nonce and calls the op for several dtypes and ranges, so
//    the seed is turned into a per-use key by a KDF, keyed BLAKE2b (libsodium's
//    crypto_generichash) with a 32-byte output:
//
//      key = BLAKE2b-256(key = seed, message = use)
//      seed = the 8 int32 seed values, each as 4 bytes little-endian (32 bytes)
//      use  = "privatekeras/chacha20-prf/v1" (28 ASCII bytes) || 0x00
//             || one byte n || the n ASCII bytes of the output dtype's name
//                ("int8", "int16", "int32" or "int64")
//             || minval as 8 bytes little-endian two's complement (sign-extended to 64 bits)
//             || maxval as 8 bytes, encoded the same way
//
//    Two parties holding the same seed and asking for the same dtype and range get the
//    same stream (ABY3's correctness rests on that); a different dtype or range gives an
//    unrelated key. The shape does not enter the key: for one seed, dtype and range a
//    larger shape extends the stream of a smaller one.
//  - PkRandomUniform draws its 256-bit ChaCha20 key directly from randombytes_buf; that key
//    is used once and never leaves the kernel, so there is nothing to derive it from.
//
// The seed bytes copied for the KDF and the derived or drawn key are wiped with
// sodium_memzero as soon as the keystream reader holds the key; the reader wipes its key
// and its keystream buffer when it is destroyed.
// (The raw keystream op that checks ChaCha20 against RFC 8439 lives in the separate test
// library pk_test_ops.cc, which production code never loads.)
//
// Bit ops: the local, share-wise bit manipulations ABY3 needs for its boolean
// circuits (bit gathering, bit reversal, xor of set-bit indices).
//
// Built against the installed TensorFlow by privatekeras.kernels.build().

#include <sodium.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "pk_common.h"

namespace {

constexpr int kSeedWords = 8;  // 8 x int32 = 256 bits
constexpr size_t kSeedBytes = kSeedWords * 4;
static_assert(kSeedBytes == crypto_stream_chacha20_ietf_KEYBYTES, "a seed is one ChaCha20 key");
static_assert(crypto_generichash_BYTES_MIN <= crypto_stream_chacha20_ietf_KEYBYTES &&
                  crypto_stream_chacha20_ietf_KEYBYTES <= crypto_generichash_BYTES_MAX,
              "BLAKE2b can output one ChaCha20 key");
static_assert(kSeedBytes >= crypto_generichash_KEYBYTES_MIN &&
                  kSeedBytes <= crypto_generichash_KEYBYTES_MAX,
              "a seed is a valid BLAKE2b key");
constexpr size_t kChunkBytes = 1 << 16;

bool EnsureSodium() {
  static const bool ok = sodium_init() >= 0;
  return ok;
}

// Sequential reader over the ChaCha20 keystream under `key`: nonce = 0, block counter
// starting at 0, produced in chunks of kChunkBytes. Wipes its key and buffer when destroyed.
class KeystreamReader {
 public:
  explicit KeystreamReader(const unsigned char key[crypto_stream_chacha20_ietf_KEYBYTES])
      : buffer_(kChunkBytes), pos_(kChunkBytes) {
    std::memcpy(key_, key, sizeof(key_));
    std::memset(nonce_, 0, sizeof(nonce_));
  }
  ~KeystreamReader() {
    sodium_memzero(key_, sizeof(key_));
    sodium_memzero(buffer_.data(), buffer_.size());
  }
  KeystreamReader(const KeystreamReader&) = delete;
  KeystreamReader& operator=(const KeystreamReader&) = delete;

  template <typename W>
  W Next() {
    if (pos_ + sizeof(W) > buffer_.size()) Refill();
    W w;
    std::memcpy(&w, buffer_.data() + pos_, sizeof(W));  // little-endian words
    pos_ += sizeof(W);
    return w;
  }

  // The next n words, as n calls of Next<W>() would return them (the chunk size is a
  // multiple of every word size, so a word never straddles two chunks).
  template <typename W>
  void Read(W* out, size_t n) {
    while (n > 0) {
      if (pos_ + sizeof(W) > buffer_.size()) Refill();
      const size_t take = std::min(n, (buffer_.size() - pos_) / sizeof(W));
      std::memcpy(out, buffer_.data() + pos_, take * sizeof(W));
      pos_ += take * sizeof(W);
      out += take;
      n -= take;
    }
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

// ----------------------------------------------------------------------------
// The KDF of PkSeededRandomUniform (see the header comment for the exact encoding).

constexpr char kKdfDomain[] = "privatekeras/chacha20-prf/v1";

template <typename T>
struct DtypeName;
template <>
struct DtypeName<int8_t> {
  static constexpr const char* kValue = "int8";
};
template <>
struct DtypeName<int16_t> {
  static constexpr const char* kValue = "int16";
};
template <>
struct DtypeName<int32_t> {
  static constexpr const char* kValue = "int32";
};
template <>
struct DtypeName<int64_t> {
  static constexpr const char* kValue = "int64";
};

void PutLe64(unsigned char* p, int64_t v) {
  const uint64_t u = static_cast<uint64_t>(v);
  for (int i = 0; i < 8; ++i) p[i] = static_cast<unsigned char>(u >> (8 * i));
}

// key = BLAKE2b-256 keyed with the seed (8 int32 little-endian) over
// domain || 0x00 || len(dtype name) || dtype name || le64(minval) || le64(maxval).
// Returns false if libsodium fails; `key` is then wiped.
template <typename T>
bool DeriveKey(const int32_t seed[kSeedWords], T minval, T maxval,
               unsigned char key[crypto_stream_chacha20_ietf_KEYBYTES]) {
  unsigned char seed_bytes[kSeedBytes];
  for (int w = 0; w < kSeedWords; ++w) {
    const uint32_t u = static_cast<uint32_t>(seed[w]);
    for (int i = 0; i < 4; ++i) seed_bytes[4 * w + i] = static_cast<unsigned char>(u >> (8 * i));
  }
  const size_t domain_len = sizeof(kKdfDomain) - 1;
  const size_t name_len = std::strlen(DtypeName<T>::kValue);
  // domain, 0x00, name length, name (at most 5 bytes: "int64"), minval, maxval
  unsigned char use[(sizeof(kKdfDomain) - 1) + 1 + 1 + 5 + 8 + 8];
  size_t n = 0;
  std::memcpy(use + n, kKdfDomain, domain_len);
  n += domain_len;
  use[n++] = 0x00;
  use[n++] = static_cast<unsigned char>(name_len);
  std::memcpy(use + n, DtypeName<T>::kValue, name_len);
  n += name_len;
  PutLe64(use + n, static_cast<int64_t>(minval));
  n += 8;
  PutLe64(use + n, static_cast<int64_t>(maxval));
  n += 8;
  const int rc = crypto_generichash(key, crypto_stream_chacha20_ietf_KEYBYTES, use, n,
                                    seed_bytes, sizeof(seed_bytes));
  sodium_memzero(seed_bytes, sizeof(seed_bytes));
  if (rc != 0) sodium_memzero(key, crypto_stream_chacha20_ietf_KEYBYTES);
  return rc == 0;
}

// Fills out[0..n) with values uniform in [minval, maxval) drawn from the stream: word w is
// rejected when w >= 2^bits - (2^bits mod range), else the value is minval + (w mod range).
// Words are read in blocks (what a block holds past the last value is never used), and
// w mod range is computed without a division when range is a power of two or w < range
// (for ABY3's full-range int64 draws, range = 2^64 - 1: every accepted word).
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
  const bool pow2 = (range & (range - 1)) == 0;
  const U base = static_cast<U>(minval);
  constexpr size_t kBlock = 1024;
  W words[kBlock];
  int64_t i = 0;
  while (i < n) {
    const size_t want = static_cast<size_t>(std::min<int64_t>(kBlock, n - i));
    stream->Read(words, want);
    for (size_t j = 0; j < want; ++j) {
      const W w = words[j];
      if (!accept_all && w >= accept_below) continue;  // rejected: the block comes up short
      const W v = pow2 ? static_cast<W>(w & (range - 1)) : (w < range ? w : w % range);
      out[i++] = static_cast<T>(static_cast<U>(base + static_cast<U>(v)));
    }
  }
  sodium_memzero(words, sizeof(words));
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
// PkSeededRandomUniform: deterministic in (seed, dtype, minval, maxval), through the KDF;
// PkRandomUniform: a fresh random key per call.

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

    const Tensor* seed_t = nullptr;
    if (kSeeded) {
      seed_t = &ctx->input(arg++);
      OP_REQUIRES(ctx, seed_t->NumElements() == kSeedWords,
                  tensorflow::errors::InvalidArgument("seed must hold 8 int32 values, got ",
                                                      seed_t->NumElements()));
    }
    const Tensor& minval_t = ctx->input(arg++);
    const Tensor& maxval_t = ctx->input(arg++);
    T minval, maxval;
    OP_REQUIRES_OK(ctx, CheckBounds<T>(minval_t, maxval_t, &minval, &maxval));

    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &out));

    // Every check that can fail has passed: the key exists only from here on, and is
    // wiped as soon as the reader holds its own copy.
    unsigned char key[crypto_stream_chacha20_ietf_KEYBYTES];
    if (kSeeded) {
      OP_REQUIRES(ctx, DeriveKey<T>(seed_t->flat<int32_t>().data(), minval, maxval, key),
                  tensorflow::errors::Internal("deriving the ChaCha20 key failed"));
    } else {
      randombytes_buf(key, sizeof(key));  // a fresh key, used for this call only
    }
    KeystreamReader stream(key);
    sodium_memzero(key, sizeof(key));
    FillUniform<T>(&stream, minval, maxval, out->flat<T>().data(), out->NumElements());
  }
};

// ----------------------------------------------------------------------------
// Bit ops on the two's-complement bit pattern of int32 / int64 values.

template <typename T>
using UnsignedOf = typename std::make_unsigned<T>::type;

// The even bits of x (bits 0, 2, 4, ...) packed into its low half, in order.
template <typename U>
U EvenBits(U x) {
  constexpr int kBits = sizeof(U) * 8;
  x = static_cast<U>(x & static_cast<U>(0x5555555555555555ULL));
  x = static_cast<U>((x | (x >> 1)) & static_cast<U>(0x3333333333333333ULL));
  x = static_cast<U>((x | (x >> 2)) & static_cast<U>(0x0F0F0F0F0F0F0F0FULL));
  if (kBits > 8) x = static_cast<U>((x | (x >> 4)) & static_cast<U>(0x00FF00FF00FF00FFULL));
  if (kBits > 16) x = static_cast<U>((x | (x >> 8)) & static_cast<U>(0x0000FFFF0000FFFFULL));
  if (kBits > 32) x = static_cast<U>((x | (x >> 16)) & static_cast<U>(0x00000000FFFFFFFFULL));
  return x;
}

// Bits start, start + stride, ... of x, packed into the low bits of the result.
template <typename T>
T GatherBits(T x, int start, int stride) {
  constexpr int kBits = sizeof(T) * 8;
  const UnsignedOf<T> ux = static_cast<UnsignedOf<T>>(x);
  if (stride == 1) return static_cast<T>(static_cast<UnsignedOf<T>>(ux >> start));
  if (stride == 2) {
    return static_cast<T>(EvenBits<UnsignedOf<T>>(static_cast<UnsignedOf<T>>(ux >> start)));
  }
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
