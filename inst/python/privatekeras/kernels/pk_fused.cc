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
// ReLU, whole (PkMsbShare, PkMsbBegin, the levels above, PkReluSend, PkReluFinish): the
// comparison is the msb of -x (1 when x > 0) by ABY3's bit extraction, its selection x * b
// ABY3's bit injection by three-party OT, each round one op per party and one message per
// party pair. See privatekeras/mpc/tfe_compat.py (_fused_relu) for the schedule and the
// words each round reads from the pairwise-PRF streams.
//
// Built into pk_ops.so by privatekeras.kernels.build().

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "pk_common.h"

using tensorflow::DataType;

namespace {

using privatekeras::CheckStream;
using privatekeras::ForRange;
using privatekeras::RowsOf;
using privatekeras::u64;

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

// The carry levels compact bits with Even() (portable shifts and masks) or, where the CPU
// has BMI2, with one PEXT (EvenPext, below; chosen at run time; both give the same bits;
// PRIVATEKERAS_RING_ISA=generic forces the portable one, as it does for the ring kernels).
bool HasBmi2() {
  static const bool has = [] {
    const char* isa = std::getenv("PRIVATEKERAS_RING_ISA");
    return !(isa != nullptr && std::strcmp(isa, "generic") == 0) &&
           __builtin_cpu_supports("bmi2");
  }();
  return has;
}

// ABY3's AND of two replicated boolean sharings, this party's part: (a_own, a_next) and
// (b_own, b_next) -> a_own&b_own ^ a_own&b_next ^ a_next&b_own (before the mask).
inline u64 AndShare(u64 a0, u64 a1, u64 b0, u64 b1) { return (a0 & b0) ^ (a0 & b1) ^ (a1 & b0); }

template <typename T>
inline u64 Load(const T* p, int64_t i) {
  return static_cast<u64>(static_cast<typename std::make_unsigned<T>::type>(p[i]));
}

// Words of a stream that n masks of `bits` bits use.
int64_t MaskWords(int64_t n, int bits) { return (n * bits + 63) / 64; }

// Both of a party's PRF streams (f0: with the previous party, f1: with the next) hold the
// words [offset, offset + words) that op `op` reads.
Status CheckStreams(const char* op, const Tensor& f0, const Tensor& f1, int64_t offset,
                    int64_t words) {
  TF_RETURN_IF_ERROR(CheckStream(op, "f0", f0, offset, words));
  return CheckStream(op, "f1", f1, offset, words);
}

// Element e's mask of `bits` bits (bits divides 64) from the streams, from word `base`.
inline u64 MaskBits(const int64_t* f0, const int64_t* f1, int64_t e, int bits) {
  const int64_t bit = e * bits;
  const u64 w = static_cast<u64>(f0[bit >> 6]) ^ static_cast<u64>(f1[bit >> 6]);
  return bits == 64 ? w : (w >> (bit & 63)) & Mask(bits);
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
    OP_REQUIRES_OK(ctx, CheckStreams("PkCarryBegin", f0, f1, offset_, MaskWords(n, 64)));
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

// One carry level over elements [lo, hi): what PkCarryLevel computes (see its Compute).
template <typename TI, typename TO>
struct LevelArgs {
  const TI* zo;
  const TI* zn;
  const u64* kin;
  const int64_t* m0;
  const int64_t* m1;
  TO* out;
  u64* kout;
  int64_t n;
  int k;
  bool first;
};

// One carry level over elements [lo, hi) (what PkCarryLevel computes, see its Compute), with
// EVEN the bit compaction: written once, expanded in portable code and in code for BMI2.
#define PK_CARRY_LEVEL_SPAN(EVEN)                                                       \
  const int64_t n = a.n;                                                               \
  const int k = a.k, h = a.k / 2;                                                      \
  const u64 mk = Mask(k), mh = Mask(h);                                                \
  for (int64_t e = lo; e < hi; ++e) {                                                  \
    u64 g0, g1, p0, p1;                                                                \
    const u64 x = Load(a.zo, e), y = Load(a.zn, e);                                    \
    if (a.first) { /* z: the first AND (G); keep: P */                                 \
      g0 = x;                                                                          \
      g1 = y;                                                                          \
      p0 = a.kin[e];                                                                   \
      p1 = a.kin[n + e];                                                               \
    } else { /* z: [G-AND | P-AND] of width k each; keep: the odd bits of G */         \
      g0 = a.kin[e] ^ (x & mk);                                                        \
      g1 = a.kin[n + e] ^ (y & mk);                                                    \
      p0 = (x >> k) & mk;                                                              \
      p1 = (y >> k) & mk;                                                              \
    }                                                                                  \
    const u64 ge0 = EVEN(g0), ge1 = EVEN(g1), go0 = EVEN(g0 >> 1), go1 = EVEN(g1 >> 1); \
    const u64 pe0 = EVEN(p0), pe1 = EVEN(p1), po0 = EVEN(p0 >> 1), po1 = EVEN(p1 >> 1); \
    const u64 and_g = AndShare(ge0, ge1, po0, po1) & mh; /* Gs0 & Ps1 */               \
    const u64 and_p = AndShare(pe0, pe1, po0, po1) & mh; /* Ps0 & Ps1 */               \
    const u64 mask = MaskBits(a.m0, a.m1, e, k);                                       \
    a.out[e] = static_cast<TO>((and_g | (and_p << h)) ^ mask);                         \
    a.kout[e] = go0 & mh;                                                              \
    a.kout[n + e] = go1 & mh;                                                          \
  }

template <typename TI, typename TO>
void LevelSpanPortable(const LevelArgs<TI, TO>& a, int64_t lo, int64_t hi) {
  PK_CARRY_LEVEL_SPAN(Even)
}

#pragma GCC push_options
#pragma GCC target("bmi2")
inline u64 EvenPext(u64 x) { return _pext_u64(x, 0x5555555555555555ULL); }

template <typename TI, typename TO>
void LevelSpanBmi2(const LevelArgs<TI, TO>& a, int64_t lo, int64_t hi) {
  PK_CARRY_LEVEL_SPAN(EvenPext)
}
#pragma GCC pop_options
#undef PK_CARRY_LEVEL_SPAN

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
    OP_REQUIRES_OK(ctx, CheckStreams("PkCarryLevel", f0, f1, offset_, MaskWords(n, k_)));
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
    LevelArgs<TI, TO> a;
    a.zo = zo_t.flat<TI>().data();
    a.zn = zn_t.flat<TI>().data();
    a.kin = reinterpret_cast<const u64*>(keep_t.flat<int64_t>().data());
    a.m0 = f0.flat<int64_t>().data() + offset_;
    a.m1 = f1.flat<int64_t>().data() + offset_;
    a.out = z_t->flat<TO>().data();
    a.kout = reinterpret_cast<u64*>(kout_t->flat<int64_t>().data());
    a.n = n;
    a.k = k_;
    a.first = first_;
    const bool bmi2 = HasBmi2();
    ForRange(ctx, n, 40, [&](int64_t lo, int64_t hi) {
      if (bmi2) {
        LevelSpanBmi2(a, lo, hi);
      } else {
        LevelSpanPortable(a, lo, hi);
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


// ---- ReLU -------------------------------------------------------------------------------
//
// Bit extraction of the msb of v = -x (x: an arithmetic sharing, party i holding x_i and
// x_{i+1}), as ABY3 does it: v = u + w with u = -(x_0 + x_1) (party 0 knows it) and
// w = -x_2 (parties 1 and 2 know it); u gets a boolean sharing (u ^ a_0, a_1, a_2), a_i
// this party's share of a boolean zero-sharing (PkMsbShare: party i sends its share to
// party i - 1), w the sharing (0, w, 0) that needs no message, and the carry circuit adds
// them (PkMsbBegin: its first AND, then PkCarryLevel).
inline u64 StreamWord(const int64_t* f0, const int64_t* f1, int64_t w) {
  return static_cast<u64>(f0[w]) ^ static_cast<u64>(f1[w]);
}

Status CheckParty(int party) {
  if (party < 0 || party > 2) {
    return tensorflow::errors::InvalidArgument("party must be 0, 1 or 2, got ", party);
  }
  return Status();
}

class PkMsbShareOp : public OpKernel {
 public:
  explicit PkMsbShareOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("party", &party_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("offset", &offset_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("shape", &shape_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("N", &nx_));
    OP_REQUIRES_OK(ctx, CheckParty(party_));
    OP_REQUIRES(ctx, nx_ == (party_ == 0 ? 2 : 0) && offset_ >= 0,
                tensorflow::errors::InvalidArgument("party 0 passes its two shares, the "
                                                    "others none"));
  }
  void Compute(OpKernelContext* ctx) override {
    const int64_t n = shape_.num_elements();
    const Tensor& f0 = ctx->input(nx_);
    const Tensor& f1 = ctx->input(nx_ + 1);
    OP_REQUIRES_OK(ctx, CheckStreams("PkMsbShare", f0, f1, offset_, n));
    const int64_t* x0 = nullptr;
    const int64_t* x1 = nullptr;
    if (nx_ == 2) {
      OP_REQUIRES(ctx, ctx->input(0).shape() == shape_ && ctx->input(1).shape() == shape_,
                  tensorflow::errors::InvalidArgument("the shares must have shape ",
                                                      shape_.DebugString()));
      x0 = ctx->input(0).flat<int64_t>().data();
      x1 = ctx->input(1).flat<int64_t>().data();
    }
    Tensor* c = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape_, &c));
    const int64_t* m0 = f0.flat<int64_t>().data() + offset_;
    const int64_t* m1 = f1.flat<int64_t>().data() + offset_;
    u64* out = reinterpret_cast<u64*>(c->flat<int64_t>().data());
    ForRange(ctx, n, 4, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) {
        u64 v = StreamWord(m0, m1, e);
        if (x0 != nullptr) v ^= 0 - (static_cast<u64>(x0[e]) + static_cast<u64>(x1[e]));
        out[e] = v;
      }
    });
  }

 private:
  int party_, nx_;
  int64_t offset_;
  TensorShape shape_;
};

// The first AND of the carry of u + w below bit 63 (TF Encrypted shifts bit 62 to the top:
// shift 1), with keep = P's shares and top = bit 63 of u ^ w's shares (the msb is the carry
// into bit 63 xor that bit).
class PkMsbBeginOp : public OpKernel {
 public:
  explicit PkMsbBeginOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("party", &party_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("offset", &offset_));
    OP_REQUIRES_OK(ctx, CheckParty(party_));
    OP_REQUIRES(ctx, offset_ >= 0, tensorflow::errors::InvalidArgument("offset >= 0"));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& co = ctx->input(0);
    const Tensor& cn = ctx->input(1);
    const Tensor& xo = ctx->input(2);
    const Tensor& xn = ctx->input(3);
    const Tensor& f0 = ctx->input(4);
    const Tensor& f1 = ctx->input(5);
    const int64_t n = co.NumElements();
    for (const Tensor* t : {&cn, &xo, &xn}) {
      OP_REQUIRES(ctx, t->shape() == co.shape(),
                  tensorflow::errors::InvalidArgument("the shares must have one shape"));
    }
    OP_REQUIRES_OK(ctx, CheckStreams("PkMsbBegin", f0, f1, offset_, n));
    TensorShape two({2});
    two.AppendShape(co.shape());
    Tensor *z = nullptr, *keep = nullptr, *top = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, co.shape(), &z));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, two, &keep));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, two, &top));
    const u64* c0 = reinterpret_cast<const u64*>(co.flat<int64_t>().data());
    const u64* c1 = reinterpret_cast<const u64*>(cn.flat<int64_t>().data());
    const u64* x0 = reinterpret_cast<const u64*>(xo.flat<int64_t>().data());
    const u64* x1 = reinterpret_cast<const u64*>(xn.flat<int64_t>().data());
    const int64_t* m0 = f0.flat<int64_t>().data() + offset_;
    const int64_t* m1 = f1.flat<int64_t>().data() + offset_;
    u64* zo = reinterpret_cast<u64*>(z->flat<int64_t>().data());
    u64* ko = reinterpret_cast<u64*>(keep->flat<int64_t>().data());
    int8_t* to = top->flat<int8_t>().data();
    const int party = party_;
    ForRange(ctx, n, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) {
        // w's shares: party 1 holds (0, w), party 2 (w, 0), party 0 (0, 0); w = -x_2.
        const u64 w0 = party == 2 ? 0 - x0[e] : 0;
        const u64 w1 = party == 1 ? 0 - x1[e] : 0;
        const u64 p0 = c0[e] ^ w0, p1 = c1[e] ^ w1;
        zo[e] = AndShare(c0[e] << 1, c1[e] << 1, w0 << 1, w1 << 1) ^ StreamWord(m0, m1, e);
        ko[e] = p0 << 1;
        ko[n + e] = p1 << 1;
        to[e] = static_cast<int8_t>(p0 >> 63);
        to[n + e] = static_cast<int8_t>(p1 >> 63);
      }
    });
  }

 private:
  int party_;
  int64_t offset_;
};

// The selection x * b of ABY3's ReLU (b: the msb's boolean sharing, 1 when x > 0) as two
// bit injections by three-party OT (ABY3, section 5.4.1): term T (T = 0, 1) has sender
// s = party T, which knows a_0 = x_0 (T = 0) or a_1 = x_1 + x_2 (T = 1) and t = its two
// shares of b xored; receivers r1 = s + 1 and r2 = s + 2 both know c = b_{s+2}, and
// b = t ^ c. The sender draws the result's two shares z_s (with r2) and z_r1 (with r1)
// from the pairwise PRFs, and sends each receiver m_j ^ w_j for j = 0, 1, where
// m_j = (t ^ j) * a - z_s - z_r1 and w_j comes from the PRF it shares with the OTHER
// receiver, who sends w_c (the helper's message). Each receiver learns m_c = a * b - z_s -
// z_r1 only, the third share. The terms' sums are the result's shares.
//
// Words of each stream (from `offset`), for term T: [3nT, 3nT + n) the share z drawn with
// that neighbour, [3nT + n, 3nT + 3n) the OT masks (element e: words 2e, 2e + 1).
inline int Role(int party, int term) { return (party - term + 3) % 3; }
inline int64_t ToNextWords(int role, int64_t n) { return role == 0 ? 2 * n : role == 1 ? n : 0; }
inline int64_t ToPrevWords(int role, int64_t n) { return role == 0 ? 2 * n : role == 2 ? n : 0; }
constexpr int kTerms = 2;

Status SelectStreams(const char* op, const Tensor& f0, const Tensor& f1, int64_t offset,
                     int64_t n) {
  return CheckStreams(op, f0, f1, offset, 3 * kTerms * n);
}

class PkReluSendOp : public OpKernel {
 public:
  explicit PkReluSendOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("party", &party_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("offset", &offset_));
    OP_REQUIRES_OK(ctx, CheckParty(party_));
    OP_REQUIRES(ctx, offset_ >= 0, tensorflow::errors::InvalidArgument("offset >= 0"));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& zo = ctx->input(0);
    const Tensor& zn = ctx->input(1);
    const Tensor& keep = ctx->input(2);
    const Tensor& top = ctx->input(3);
    const Tensor& xo = ctx->input(4);
    const Tensor& xn = ctx->input(5);
    const Tensor& f0 = ctx->input(6);
    const Tensor& f1 = ctx->input(7);
    const int64_t n = xo.NumElements();
    OP_REQUIRES(ctx, xn.shape() == xo.shape() && zo.NumElements() == n &&
                     zn.NumElements() == n && keep.NumElements() == 2 * n &&
                     top.NumElements() == 2 * n,
                tensorflow::errors::InvalidArgument("the carry and the shares do not match"));
    OP_REQUIRES_OK(ctx, SelectStreams("PkReluSend", f0, f1, offset_, n));
    int64_t next_words = 0, prev_words = 0;
    for (int t = 0; t < kTerms; ++t) {
      next_words += ToNextWords(Role(party_, t), n);
      prev_words += ToPrevWords(Role(party_, t), n);
    }
    TensorShape two({2});
    two.AppendShape(xo.shape());
    Tensor *to_next = nullptr, *to_prev = nullptr, *bits = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({next_words}), &to_next));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({prev_words}), &to_prev));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, two, &bits));
    const int8_t* za = zo.flat<int8_t>().data();
    const int8_t* zb = zn.flat<int8_t>().data();
    const int64_t* kin = keep.flat<int64_t>().data();
    const int8_t* tin = top.flat<int8_t>().data();
    const u64* x0 = reinterpret_cast<const u64*>(xo.flat<int64_t>().data());
    const u64* x1 = reinterpret_cast<const u64*>(xn.flat<int64_t>().data());
    const u64* g0 = reinterpret_cast<const u64*>(f0.flat<int64_t>().data() + offset_);
    const u64* g1 = reinterpret_cast<const u64*>(f1.flat<int64_t>().data() + offset_);
    u64* onext = reinterpret_cast<u64*>(to_next->flat<int64_t>().data());
    u64* oprev = reinterpret_cast<u64*>(to_prev->flat<int64_t>().data());
    int8_t* b = bits->flat<int8_t>().data();
    const int party = party_;
    ForRange(ctx, n, 40, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) {
        const u64 b0 = ((kin[e] ^ za[e]) & 1) ^ (tin[e] & 1);
        const u64 b1 = ((kin[n + e] ^ zb[e]) & 1) ^ (tin[n + e] & 1);
        b[e] = static_cast<int8_t>(b0);
        b[n + e] = static_cast<int8_t>(b1);
        int64_t at_next = 0, at_prev = 0;  // where term t's blocks start
        for (int t = 0; t < kTerms; ++t) {
          const int role = Role(party, t);
          const int64_t z = 3 * n * t, w = z + n;
          if (role == 0) {  // sender: to r1 (next) masked by the PRF with r2 (f0), and back
            const u64 a = t == 0 ? x0[e] : x0[e] + x1[e];
            const u64 tb = b0 ^ b1;
            const u64 base = 0 - g0[z + e] - g1[z + e];
            for (int j = 0; j < 2; ++j) {
              const u64 m = ((tb ^ j) ? a : 0) + base;
              onext[at_next + 2 * e + j] = m ^ g0[w + 2 * e + j];
              oprev[at_prev + 2 * e + j] = m ^ g1[w + 2 * e + j];
            }
          } else if (role == 1) {  // helper of r2's OT: its mask w_c, c = b_{s+2} = b1
            onext[at_next + e] = g0[w + 2 * e + b1];
          } else {                 // helper of r1's OT: w_c, c = b_{s+2} = b0
            oprev[at_prev + e] = g1[w + 2 * e + b0];
          }
          at_next += ToNextWords(role, n);
          at_prev += ToPrevWords(role, n);
        }
      }
    });
  }

 private:
  int party_;
  int64_t offset_;
};

class PkReluFinishOp : public OpKernel {
 public:
  explicit PkReluFinishOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("party", &party_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("offset", &offset_));
    OP_REQUIRES_OK(ctx, CheckParty(party_));
    OP_REQUIRES(ctx, offset_ >= 0, tensorflow::errors::InvalidArgument("offset >= 0"));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& from_prev = ctx->input(0);
    const Tensor& from_next = ctx->input(1);
    const Tensor& bits = ctx->input(2);
    const Tensor& f0 = ctx->input(3);
    const Tensor& f1 = ctx->input(4);
    OP_REQUIRES(ctx, bits.dims() >= 1 && bits.dim_size(0) == 2,
                tensorflow::errors::InvalidArgument("b must hold two shares"));
    TensorShape shape = bits.shape();
    shape.RemoveDim(0);
    const int64_t n = shape.num_elements();
    const int prev = (party_ + 2) % 3, next = (party_ + 1) % 3;
    int64_t prev_words = 0, next_words = 0;  // what the neighbours sent this party
    for (int t = 0; t < kTerms; ++t) {
      prev_words += ToNextWords(Role(prev, t), n);
      next_words += ToPrevWords(Role(next, t), n);
    }
    OP_REQUIRES(ctx, from_prev.NumElements() == prev_words &&
                     from_next.NumElements() == next_words,
                tensorflow::errors::InvalidArgument(
                    "the selection's messages have ", from_prev.NumElements(), " and ",
                    from_next.NumElements(), " words; expected ", prev_words, " and ",
                    next_words));
    OP_REQUIRES_OK(ctx, SelectStreams("PkReluFinish", f0, f1, offset_, n));
    Tensor *yo = nullptr, *yn = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &yo));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, shape, &yn));
    const u64* mp = reinterpret_cast<const u64*>(from_prev.flat<int64_t>().data());
    const u64* mn = reinterpret_cast<const u64*>(from_next.flat<int64_t>().data());
    const int8_t* b = bits.flat<int8_t>().data();
    const u64* g0 = reinterpret_cast<const u64*>(f0.flat<int64_t>().data() + offset_);
    const u64* g1 = reinterpret_cast<const u64*>(f1.flat<int64_t>().data() + offset_);
    u64* oo = reinterpret_cast<u64*>(yo->flat<int64_t>().data());
    u64* on = reinterpret_cast<u64*>(yn->flat<int64_t>().data());
    const int party = party_;
    ForRange(ctx, n, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) {
        u64 own = 0, nxt = 0;
        int64_t at_prev = 0, at_next = 0;
        for (int t = 0; t < kTerms; ++t) {
          const int role = Role(party, t);
          const int64_t z = 3 * n * t;
          if (role == 0) {         // the sender's shares: z_s (with r2 = prev), z_r1
            own += g0[z + e];
            nxt += g1[z + e];
          } else if (role == 1) {  // r1: z_r1 (with s = prev), then m_c; c = b_{s+2}
            const int c = b[n + e] & 1;
            own += g0[z + e];
            nxt += mp[at_prev + 2 * e + c] ^ mn[at_next + e];
          } else {                 // r2: m_c (from s = next, mask from r1), then z_s
            const int c = b[e] & 1;
            own += mn[at_next + 2 * e + c] ^ mp[at_prev + e];
            nxt += g1[z + e];
          }
          at_prev += ToNextWords(Role(prev, t), n);
          at_next += ToPrevWords(Role(next, t), n);
        }
        oo[e] = own;
        on[e] = nxt;
      }
    });
  }

 private:
  int party_;
  int64_t offset_;
};

// Output 0 shaped as input 0, then outputs 1 .. last each [2] + that shape.
Status SameThenTwos(InferenceContext* c, int last) {
  ShapeHandle two;
  TF_RETURN_IF_ERROR(RowsOf(c, 2, 0, &two));
  c->set_output(0, c->input(0));
  for (int k = 1; k <= last; ++k) c->set_output(k, two);
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
    .SetShapeFn([](InferenceContext* c) { return SameThenTwos(c, 1); });

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

REGISTER_OP("PkMsbShare")
    .Input("x: N * int64")
    .Input("f0: int64")
    .Input("f1: int64")
    .Output("c: int64")
    .Attr("N: int >= 0")
    .Attr("party: int")
    .Attr("offset: int")
    .Attr("shape: shape")
    .SetShapeFn([](InferenceContext* c) {
      tensorflow::PartialTensorShape shape;
      TF_RETURN_IF_ERROR(c->GetAttr("shape", &shape));
      ShapeHandle out;
      TF_RETURN_IF_ERROR(c->MakeShapeFromPartialTensorShape(shape, &out));
      c->set_output(0, out);
      return Status();
    });

REGISTER_OP("PkMsbBegin")
    .Input("c_own: int64")
    .Input("c_next: int64")
    .Input("x_own: int64")
    .Input("x_next: int64")
    .Input("f0: int64")
    .Input("f1: int64")
    .Output("z: int64")
    .Output("keep: int64")
    .Output("top: int8")
    .Attr("party: int")
    .Attr("offset: int")
    .SetShapeFn([](InferenceContext* c) { return SameThenTwos(c, 2); });

REGISTER_OP("PkReluSend")
    .Input("z_own: int8")
    .Input("z_next: int8")
    .Input("keep: int64")
    .Input("top: int8")
    .Input("x_own: int64")
    .Input("x_next: int64")
    .Input("f0: int64")
    .Input("f1: int64")
    .Output("to_next: int64")
    .Output("to_prev: int64")
    .Output("b: int8")
    .Attr("party: int")
    .Attr("offset: int")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Vector(InferenceContext::kUnknownDim));
      c->set_output(1, c->Vector(InferenceContext::kUnknownDim));
      ShapeHandle two;
      TF_RETURN_IF_ERROR(RowsOf(c, 2, 4, &two));
      c->set_output(2, two);
      return Status();
    });

REGISTER_OP("PkReluFinish")
    .Input("from_prev: int64")
    .Input("from_next: int64")
    .Input("b: int8")
    .Input("f0: int64")
    .Input("f1: int64")
    .Output("y_own: int64")
    .Output("y_next: int64")
    .Attr("party: int")
    .Attr("offset: int")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle shape;
      TF_RETURN_IF_ERROR(c->Subshape(c->input(2), 1, &shape));
      c->set_output(0, shape);
      c->set_output(1, shape);
      return Status();
    });

REGISTER_KERNEL_BUILDER(Name("PkMsbShare").Device(DEVICE_CPU), PkMsbShareOp);
REGISTER_KERNEL_BUILDER(Name("PkMsbBegin").Device(DEVICE_CPU), PkMsbBeginOp);
REGISTER_KERNEL_BUILDER(Name("PkReluSend").Device(DEVICE_CPU), PkReluSendOp);
REGISTER_KERNEL_BUILDER(Name("PkReluFinish").Device(DEVICE_CPU), PkReluFinishOp);
