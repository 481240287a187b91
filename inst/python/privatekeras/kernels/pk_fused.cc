// privatekeras fused ABY3 kernels: the carry circuit of the bit decomposition (ReLU, MSB).
//
// TF Encrypted computes the carry of x + y (boolean sharings, 64 bits) with a Kogge-Stone
// tree: G = x & y, P = x ^ y, then six levels of
//     Gs, Ps = the even and odd bits of G and P;  G = Gs1 ^ (Gs0 & Ps1);  P = Ps0 & Ps1
// (each & of two sharings is one ABY3 AND: a local product of the shares, masked with a
// zero-sharing, then party i+1 sends its result to party i). That is ~560 TensorFlow ops per
// party per ReLU (splits, casts, slices, the three products and xors of each AND, the
// zero-sharings' PRF calls). Here one op per party does a whole level's local work, for all
// bits and elements at once, and leaves ONE tensor to send per level: both ANDs' results
// packed into one word ([G-AND bits | P-AND bits], the width of the level), so a level
// costs one message per party pair, not two.
//
//   PkCarryBegin(x_a, x_b, y_a, y_b, f0, f1)      -> z (int64), keep [2, ...] (int64)
//       the first AND, z = ((x<<s) & (y<<s)) on the shares, xor the mask; keep = P's shares
//   PkCarryLevel(z_own, z_next, keep, f0, f1)     -> z (k bits), keep [2, ...]
//       G, P of width k from the last exchange (z_own: this party's z, z_next: the one it
//       received from the next party), split, the two ANDs packed, xor the mask
//   PkCarryFinish(z_own, z_next, keep)            -> the carry bit's two shares (int8)
//
// Masks: party i's zero-sharing of each AND is f0 ^ f1, where f0 and f1 are its two
// pairwise-PRF streams (PkSeededRandomUniform under the keys it shares with its two
// neighbours, exactly ABY3's zero-sharing). A level of width k reads k bits per element from
// its own range of the streams, starting at word `offset`: element e's mask is bits
// [(e*k) mod 64, +k) of word offset + (e*k) / 64 (k divides 64), so no bit is used twice and a
// narrow level draws only the bits it needs. The three parties' masks xor to zero, so the
// ANDs reconstruct exactly as TF Encrypted's do.
//
// Built into pk_ops.so by privatekeras.kernels.build().

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/util/work_sharder.h"

using tensorflow::DataType;
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

using u64 = uint64_t;

// Bits 0, 2, 4, ... of x packed into its low half, in order.
inline u64 Even(u64 x) {
  x &= 0x5555555555555555ULL;
  x = (x | (x >> 1)) & 0x3333333333333333ULL;
  x = (x | (x >> 2)) & 0x0F0F0F0F0F0F0F0FULL;
  x = (x | (x >> 4)) & 0x00FF00FF00FF00FFULL;
  x = (x | (x >> 8)) & 0x0000FFFF0000FFFFULL;
  x = (x | (x >> 16)) & 0x00000000FFFFFFFFULL;
  return x;
}

inline u64 Mask(int bits) { return bits >= 64 ? ~0ULL : ((1ULL << bits) - 1); }

// ABY3's AND of two replicated boolean sharings, this party's part: (a_own, a_next) and
// (b_own, b_next) -> a_own&b_own ^ a_own&b_next ^ a_next&b_own (before the mask).
inline u64 AndShare(u64 a0, u64 a1, u64 b0, u64 b1) { return (a0 & b0) ^ (a0 & b1) ^ (a1 & b0); }

template <typename T>
inline u64 Load(const T* p, int64_t i) {
  return static_cast<u64>(static_cast<typename std::make_unsigned<T>::type>(p[i]));
}

// Words of a stream that n masks of `bits` bits use.
int64_t MaskWords(int64_t n, int bits) { return (n * bits + 63) / 64; }

Status CheckStream(const Tensor& f, int64_t offset, int64_t words) {
  if (f.dtype() != tensorflow::DT_INT64 || f.NumElements() < offset + words) {
    return tensorflow::errors::InvalidArgument("a PRF stream must hold at least ",
                                               offset + words, " int64 words, got ",
                                               f.NumElements());
  }
  return Status();
}

// Element e's mask of `bits` bits (bits divides 64) from the streams, from word `base`.
inline u64 MaskBits(const int64_t* f0, const int64_t* f1, int64_t e, int bits) {
  const int64_t bit = e * bits;
  const u64 w = static_cast<u64>(f0[bit >> 6]) ^ static_cast<u64>(f1[bit >> 6]);
  return bits == 64 ? w : (w >> (bit & 63)) & Mask(bits);
}

template <typename F>
void ForRange(OpKernelContext* ctx, int64_t n, int64_t cost, F f) {
  const auto* threads = ctx->device()->tensorflow_cpu_worker_threads();
  if (n < (1 << 14) || threads == nullptr) {
    f(0, n);
    return;
  }
  tensorflow::Shard(threads->num_threads, threads->workers, n, cost, f);
}

class PkCarryBeginOp : public OpKernel {
 public:
  explicit PkCarryBeginOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("shift", &shift_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("offset", &offset_));
    OP_REQUIRES(ctx, shift_ >= 0 && shift_ < 64 && offset_ >= 0,
                tensorflow::errors::InvalidArgument("need 0 <= shift < 64, offset >= 0"));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& xa = ctx->input(0);
    const Tensor& xb = ctx->input(1);
    const Tensor& ya = ctx->input(2);
    const Tensor& yb = ctx->input(3);
    const Tensor& f0 = ctx->input(4);
    const Tensor& f1 = ctx->input(5);
    const int64_t n = xa.NumElements();
    for (const Tensor* t : {&xb, &ya, &yb}) {
      OP_REQUIRES(ctx, t->shape() == xa.shape(),
                  tensorflow::errors::InvalidArgument("the shares must have one shape"));
    }
    OP_REQUIRES_OK(ctx, CheckStream(f0, offset_, MaskWords(n, 64)));
    OP_REQUIRES_OK(ctx, CheckStream(f1, offset_, MaskWords(n, 64)));
    Tensor* z = nullptr;
    Tensor* keep = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, xa.shape(), &z));
    TensorShape kshape({2});
    kshape.AppendShape(xa.shape());
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, kshape, &keep));
    const int64_t* x0 = xa.flat<int64_t>().data();
    const int64_t* x1 = xb.flat<int64_t>().data();
    const int64_t* y0 = ya.flat<int64_t>().data();
    const int64_t* y1 = yb.flat<int64_t>().data();
    const int64_t* m0 = f0.flat<int64_t>().data() + offset_;
    const int64_t* m1 = f1.flat<int64_t>().data() + offset_;
    u64* zo = reinterpret_cast<u64*>(z->flat<int64_t>().data());
    u64* ko = reinterpret_cast<u64*>(keep->flat<int64_t>().data());
    const int s = shift_;
    ForRange(ctx, n, 12, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) {
        const u64 a0 = static_cast<u64>(x0[e]) << s, a1 = static_cast<u64>(x1[e]) << s;
        const u64 b0 = static_cast<u64>(y0[e]) << s, b1 = static_cast<u64>(y1[e]) << s;
        zo[e] = AndShare(a0, a1, b0, b1) ^ static_cast<u64>(m0[e]) ^ static_cast<u64>(m1[e]);
        ko[e] = a0 ^ b0;
        ko[n + e] = a1 ^ b1;
      }
    });
  }

 private:
  int shift_;
  int64_t offset_;
};

class PkCarryLevelOp : public OpKernel {
 public:
  explicit PkCarryLevelOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("k", &k_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("first", &first_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("offset", &offset_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("Tin", &tin_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("Tout", &tout_));
    OP_REQUIRES(ctx, k_ >= 2 && k_ <= 64 && (k_ & (k_ - 1)) == 0 && offset_ >= 0,
                tensorflow::errors::InvalidArgument("k: a power of two in [2, 64]"));
    OP_REQUIRES(ctx, !first_ || k_ == 64,
                tensorflow::errors::InvalidArgument("the first level is 64 bits wide"));
    OP_REQUIRES(ctx, tensorflow::DataTypeSize(tout_) * 8 >= k_ &&
                         tensorflow::DataTypeSize(tin_) * 8 >= (first_ ? 64 : 2 * k_),
                tensorflow::errors::InvalidArgument("dtypes too narrow for k = ", k_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& zo = ctx->input(0);
    const Tensor& zn = ctx->input(1);
    const Tensor& keep = ctx->input(2);
    const Tensor& f0 = ctx->input(3);
    const Tensor& f1 = ctx->input(4);
    const int64_t n = zo.NumElements();
    OP_REQUIRES(ctx, zn.shape() == zo.shape() && keep.NumElements() == 2 * n,
                tensorflow::errors::InvalidArgument("z and keep do not match"));
    OP_REQUIRES_OK(ctx, CheckStream(f0, offset_, MaskWords(n, k_)));
    OP_REQUIRES_OK(ctx, CheckStream(f1, offset_, MaskWords(n, k_)));
    Tensor* z = nullptr;
    Tensor* kout = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, zo.shape(), &z));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, keep.shape(), &kout));
    switch (tin_) {
      case tensorflow::DT_INT64: return Out<int64_t>(ctx, zo, zn, keep, f0, f1, z, kout, n);
      case tensorflow::DT_INT32: return Out<int32_t>(ctx, zo, zn, keep, f0, f1, z, kout, n);
      case tensorflow::DT_INT16: return Out<int16_t>(ctx, zo, zn, keep, f0, f1, z, kout, n);
      default: return Out<int8_t>(ctx, zo, zn, keep, f0, f1, z, kout, n);
    }
  }

 private:
  template <typename TI>
  void Out(OpKernelContext* ctx, const Tensor& zo, const Tensor& zn, const Tensor& keep,
           const Tensor& f0, const Tensor& f1, Tensor* z, Tensor* kout, int64_t n) {
    switch (tout_) {
      case tensorflow::DT_INT64: return Run<TI, int64_t>(ctx, zo, zn, keep, f0, f1, z, kout, n);
      case tensorflow::DT_INT32: return Run<TI, int32_t>(ctx, zo, zn, keep, f0, f1, z, kout, n);
      case tensorflow::DT_INT16: return Run<TI, int16_t>(ctx, zo, zn, keep, f0, f1, z, kout, n);
      default: return Run<TI, int8_t>(ctx, zo, zn, keep, f0, f1, z, kout, n);
    }
  }

  template <typename TI, typename TO>
  void Run(OpKernelContext* ctx, const Tensor& zo_t, const Tensor& zn_t, const Tensor& keep_t,
           const Tensor& f0, const Tensor& f1, Tensor* z_t, Tensor* kout_t, int64_t n) {
    const TI* zo = zo_t.flat<TI>().data();
    const TI* zn = zn_t.flat<TI>().data();
    const u64* kin = reinterpret_cast<const u64*>(keep_t.flat<int64_t>().data());
    const int64_t* m0 = f0.flat<int64_t>().data() + offset_;
    const int64_t* m1 = f1.flat<int64_t>().data() + offset_;
    TO* out = z_t->flat<TO>().data();
    u64* kout = reinterpret_cast<u64*>(kout_t->flat<int64_t>().data());
    const int k = k_, h = k_ / 2;
    const bool first = first_;
    const u64 mk = Mask(k), mh = Mask(h);
    ForRange(ctx, n, 40, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) {
        u64 g0, g1, p0, p1;
        const u64 a = Load(zo, e), b = Load(zn, e);
        if (first) {  // z: the first AND (G); keep: P
          g0 = a;
          g1 = b;
          p0 = kin[e];
          p1 = kin[n + e];
        } else {      // z: [G-AND | P-AND] of width k each; keep: the odd bits of G
          g0 = kin[e] ^ (a & mk);
          g1 = kin[n + e] ^ (b & mk);
          p0 = (a >> k) & mk;
          p1 = (b >> k) & mk;
        }
        const u64 ge0 = Even(g0), ge1 = Even(g1), go0 = Even(g0 >> 1), go1 = Even(g1 >> 1);
        const u64 pe0 = Even(p0), pe1 = Even(p1), po0 = Even(p0 >> 1), po1 = Even(p1 >> 1);
        const u64 and_g = AndShare(ge0, ge1, po0, po1) & mh;  // Gs0 & Ps1
        const u64 and_p = AndShare(pe0, pe1, po0, po1) & mh;  // Ps0 & Ps1
        const u64 mask = MaskBits(m0, m1, e, k);
        out[e] = static_cast<TO>((and_g | (and_p << h)) ^ mask);
        kout[e] = go0 & mh;
        kout[n + e] = go1 & mh;
      }
    });
  }

  int k_;
  bool first_;
  int64_t offset_;
  DataType tin_, tout_;
};

class PkCarryFinishOp : public OpKernel {
 public:
  explicit PkCarryFinishOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    const Tensor& zo = ctx->input(0);
    const Tensor& zn = ctx->input(1);
    const Tensor& keep = ctx->input(2);
    const int64_t n = zo.NumElements();
    OP_REQUIRES(ctx, zn.shape() == zo.shape() && keep.NumElements() == 2 * n,
                tensorflow::errors::InvalidArgument("z and keep do not match"));
    Tensor* ca = nullptr;
    Tensor* cb = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, zo.shape(), &ca));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, zo.shape(), &cb));
    const int8_t* a = zo.flat<int8_t>().data();
    const int8_t* b = zn.flat<int8_t>().data();
    const int64_t* kin = keep.flat<int64_t>().data();
    int8_t* oa = ca->flat<int8_t>().data();
    int8_t* ob = cb->flat<int8_t>().data();
    for (int64_t e = 0; e < n; ++e) {  // G = keep ^ G-AND, the carry is its only bit
      oa[e] = static_cast<int8_t>((kin[e] ^ a[e]) & 1);
      ob[e] = static_cast<int8_t>((kin[n + e] ^ b[e]) & 1);
    }
  }
};

Status SameAndKeep(InferenceContext* c) {
  ShapeHandle keep;
  TF_RETURN_IF_ERROR(c->Concatenate(c->Vector(2), c->input(0), &keep));
  c->set_output(0, c->input(0));
  c->set_output(1, keep);
  return Status();
}

}  // namespace

REGISTER_OP("PkCarryBegin")
    .Input("x_own: int64")
    .Input("x_next: int64")
    .Input("y_own: int64")
    .Input("y_next: int64")
    .Input("f0: int64")
    .Input("f1: int64")
    .Output("z: int64")
    .Output("keep: int64")
    .Attr("shift: int")
    .Attr("offset: int")
    .SetShapeFn(SameAndKeep);

REGISTER_OP("PkCarryLevel")
    .Input("z_own: Tin")
    .Input("z_next: Tin")
    .Input("keep: int64")
    .Input("f0: int64")
    .Input("f1: int64")
    .Output("z: Tout")
    .Output("keep_out: int64")
    .Attr("k: int")
    .Attr("first: bool")
    .Attr("offset: int")
    .Attr("Tin: {int8, int16, int32, int64}")
    .Attr("Tout: {int8, int16, int32, int64}")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(2));
      return Status();
    });

REGISTER_OP("PkCarryFinish")
    .Input("z_own: int8")
    .Input("z_next: int8")
    .Input("keep: int64")
    .Output("carry_own: int8")
    .Output("carry_next: int8")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(0));
      return Status();
    });

REGISTER_KERNEL_BUILDER(Name("PkCarryBegin").Device(DEVICE_CPU), PkCarryBeginOp);
REGISTER_KERNEL_BUILDER(Name("PkCarryLevel").Device(DEVICE_CPU), PkCarryLevelOp);
REGISTER_KERNEL_BUILDER(Name("PkCarryFinish").Device(DEVICE_CPU), PkCarryFinishOp);
