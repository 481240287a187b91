// privatekeras fused ABY3 truncation: TF Encrypted's heuristic truncation of a product
// (shift right by `amount` fractional bits), one op per party per round.
//
// TF Encrypted 0.9.1 truncates x (replicated arithmetic shares x_0 + x_1 + x_2 mod 2^64,
// party i holding (x_i, x_{i+1})) by lifting it, x' = x + 2^lift (lift = 62, so x' has a
// zero top bit whenever |x| < 2^62), running the SecureQ8-style protocol below on x', and
// subtracting 2^(lift - amount) from the result. Written as TensorFlow ops that is ~117 ops
// per truncation (PRF draws, slices, casts, wheres); here it is one kernel per party per
// round, in TF Encrypted's two rounds:
//
//   round 0  P2  PkTruncDeal(r, f_prev, f_next)        -> deal [3, ...], y2, y0 - 2^(lift-f)
//                the dealer: r is P2's private CSPRNG draw; deal = (r1, s1, m1) (P2 -> P1;
//                it depends on no input, so it is sent as the step starts)
//   round 1  P0  PkTruncMask(x_0, x_1, f_prev)          -> c0                 (P0 -> P1)
//            P1  PkTruncOpen(x_2, deal)                 -> c1                 (P1 -> P0)
//   round 2  P1  PkTruncReply(x_2, deal, c0, f_next)    -> t1, y2             (t1: P1 -> P0)
//            P0  PkTruncFinish(c0, c1, f_prev)          -> t0, y0 - 2^(lift-f) (t0: P0 -> P1)
//   then     P0, P1  t = t0 + t1 (TensorFlow's add of its own t and the one received)
//
// The protocol. Write m = 2^63 and top = 63 - amount. P2 draws r uniformly; its top bit is
// r_msb = r >> 63 and s = (r mod m) >> amount. P0 and P1 hold two-party arithmetic sharings
// r = r0 + r1, s = s0 + s1, r_msb = m0 + m1 (mod 2^64), where r0, s0, m0 come from the PRF
// stream P0 shares with P2, and P2 sends r1, s1, m1 to P1 (the dealer message). P0's share
// of x' is x_0 + x_1 + 2^lift, P1's is x_2; they open c = x' + r by exchanging
// c0 = x_0 + x_1 + 2^lift + r0 and c1 = x_2 + r1. With c' = (c mod m) >> amount,
// c_msb = c >> 63 and b = c_msb xor r_msb (as b0 = c_msb ? 1 - m0 : m0, b1 = c_msb ? -m1 :
// m1), y = c' - s + b * 2^top is x' >> amount or one more (the borrow of the low bits), and
// P0 / P1 hold y'0 = c' - s0 + b0 * 2^top, y'1 = -s1 + b1 * 2^top. The result is re-shared
// as replicated shares (y0, t, y2): y0 from the P0-P2 stream, y2 from the P1-P2 stream,
// t = t0 + t1 with t0 = y'0 - y0 (P0 -> P1) and t1 = y'1 - y2 (P1 -> P0). Final shares:
// P0 (y0, t), P1 (t, y2), P2 (y2, y0), and share 0 carries the -2^(lift - amount) that
// undoes the lift. This is TF Encrypted's protocol and message content, except that P2 reads
// y0 and y2 from its own PRF streams instead of receiving them from P0 and P1.
//
// Masks (every sent tensor is masked by randomness its receiver does not know):
//   deal (P2 -> P1): r1 = r - r0, s1 = s - s0, m1 = r_msb - m0: r0, s0, m0 are P0-P2 words.
//   c0 (P0 -> P1): x_0 + x_1 + 2^lift + r0: r0 is a P0-P2 word.
//   c1 (P1 -> P0): x_2 + r1 (r1 = r - r0, r private to P2).
//   t1 (P1 -> P0): y'1 - y2 (y2 is a P1-P2 word).
//   t0 (P0 -> P1): y'0 - y0 (y0 is a P0-P2 word).
// P1 learns c = x' + r, masked by P2's r; P0 learns c as well.
//
// Stream layout. f_prev / f_next are the party's pairwise-PRF streams (PkSeededRandomUniform
// words, int64) with its previous / next party, as ABY3's zero-sharing draws them. Each op
// reads only its own range, from word `offset`, element e of row k at word offset + k*n + e
// (n elements):
//   the P0-P2 stream (P0's f_prev, P2's f_next): rows 0 r0, 1 s0, 2 m0, 3 y0  (4n words)
//   the P1-P2 stream (P1's f_next, P2's f_prev): row 0 y2                     (n words)
// TF Encrypted draws [4] + shape and shape words for the same purposes, so the word layout
// is its layout.
//
// Built into pk_ops.so by privatekeras.kernels.build().

#include "pk_common.h"

namespace {

using privatekeras::CheckStream;
using privatekeras::ForRange;
using privatekeras::RowsOf;
using privatekeras::u64;

constexpr int kLowRows = 4;   // rows of the P0-P2 range: r0, s0, m0, y0
constexpr int kHighRows = 1;  // rows of the P1-P2 range: y2
constexpr int kDealRows = 3;  // r1, s1, m1

// Ring arithmetic mod 2^64 on the two's-complement words.
inline u64 Word(const int64_t* p, int64_t i) { return static_cast<u64>(p[i]); }
inline int64_t Signed(u64 v) { return static_cast<int64_t>(v); }

Status CheckShape(const char* op, const char* name, const Tensor& t, const TensorShape& want) {
  if (t.shape() != want) {
    return tensorflow::errors::InvalidArgument(op, ": ", name, " must have shape ",
                                               want.DebugString(), ", got shape ",
                                               t.shape().DebugString());
  }
  return Status();
}

TensorShape WithRows(int64_t rows, const TensorShape& s) {
  TensorShape out({rows});
  out.AppendShape(s);
  return out;
}

// The attrs every op shares: amount (bits truncated), lift (2^lift added before, so the
// result carries -2^(lift - amount)), offset(s) into the streams.
struct TruncAttrs {
  int amount = 0;
  int lift = 0;

  Status Read(OpKernelConstruction* ctx, bool with_amount, bool with_lift) {
    if (with_amount) {
      TF_RETURN_IF_ERROR(ctx->GetAttr("amount", &amount));
      if (amount < 1 || amount > 62) {
        return tensorflow::errors::InvalidArgument("amount must be in [1, 62], got ", amount);
      }
    }
    if (with_lift) {
      TF_RETURN_IF_ERROR(ctx->GetAttr("lift", &lift));
      if (lift < 1 || lift > 62 || (with_amount && lift < amount)) {
        return tensorflow::errors::InvalidArgument(
            "lift must be in [amount, 62], got lift ", lift, ", amount ", amount);
      }
    }
    return Status();
  }
  u64 Top() const { return 63 - amount; }  // b is worth 2^top
  u64 Cprime(u64 c) const { return (c >> amount) & ((u64{1} << (63 - amount)) - 1); }
  u64 Unlift() const { return u64{1} << (lift - amount); }
};

Status ReadOffset(OpKernelConstruction* ctx, const char* name, int64_t* offset) {
  TF_RETURN_IF_ERROR(ctx->GetAttr(name, offset));
  if (*offset < 0) return tensorflow::errors::InvalidArgument(name, " must be >= 0");
  return Status();
}

// ---------------------------------------------------------------------------------------
// P2, round 1: the dealer.

class PkTruncDealOp : public OpKernel {
 public:
  explicit PkTruncDealOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, attrs_.Read(ctx, true, true));
    OP_REQUIRES_OK(ctx, ReadOffset(ctx, "offset_prev", &offset_prev_));
    OP_REQUIRES_OK(ctx, ReadOffset(ctx, "offset_next", &offset_next_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& r_t = ctx->input(0);
    const Tensor& fp = ctx->input(1);  // with P1
    const Tensor& fn = ctx->input(2);  // with P0
    const int64_t n = r_t.NumElements();
    OP_REQUIRES_OK(ctx, CheckStream("PkTruncDeal", "f_prev", fp, offset_prev_,
                                    kHighRows * n));
    OP_REQUIRES_OK(ctx, CheckStream("PkTruncDeal", "f_next", fn, offset_next_, kLowRows * n));
    Tensor* deal_t = nullptr;
    Tensor* own_t = nullptr;
    Tensor* next_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, WithRows(kDealRows, r_t.shape()), &deal_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, r_t.shape(), &own_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, r_t.shape(), &next_t));
    const int64_t* r = r_t.flat<int64_t>().data();
    const int64_t* hi = fp.flat<int64_t>().data() + offset_prev_;
    const int64_t* lo = fn.flat<int64_t>().data() + offset_next_;
    int64_t* deal = deal_t->flat<int64_t>().data();
    int64_t* y2 = own_t->flat<int64_t>().data();
    int64_t* y0 = next_t->flat<int64_t>().data();
    const int amount = attrs_.amount;
    const u64 unlift = attrs_.Unlift();
    ForRange(ctx, n, 16, [&](int64_t a, int64_t b) {
      for (int64_t e = a; e < b; ++e) {
        const u64 rv = Word(r, e);
        const u64 s = (rv & ~(u64{1} << 63)) >> amount;
        const u64 msb = rv >> 63;
        deal[e] = Signed(rv - Word(lo, e));                   // r1 = r - r0
        deal[n + e] = Signed(s - Word(lo, n + e));            // s1 = s - s0
        deal[2 * n + e] = Signed(msb - Word(lo, 2 * n + e));  // m1 = r_msb - m0
        y2[e] = hi[e];
        y0[e] = Signed(Word(lo, 3 * n + e) - unlift);
      }
    });
  }

 private:
  TruncAttrs attrs_;
  int64_t offset_prev_, offset_next_;
};

// ---------------------------------------------------------------------------------------
// P0, round 1: its share of x' masked with r0.

class PkTruncMaskOp : public OpKernel {
 public:
  explicit PkTruncMaskOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, attrs_.Read(ctx, false, true));
    OP_REQUIRES_OK(ctx, ReadOffset(ctx, "offset", &offset_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& xo = ctx->input(0);
    const Tensor& xn = ctx->input(1);
    const Tensor& f = ctx->input(2);
    const int64_t n = xo.NumElements();
    OP_REQUIRES_OK(ctx, CheckShape("PkTruncMask", "x_next", xn, xo.shape()));
    OP_REQUIRES_OK(ctx, CheckStream("PkTruncMask", "f_prev", f, offset_, n));
    Tensor* c_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, xo.shape(), &c_t));
    const int64_t* a = xo.flat<int64_t>().data();
    const int64_t* b = xn.flat<int64_t>().data();
    const int64_t* r0 = f.flat<int64_t>().data() + offset_;  // row 0 of the P0-P2 range
    int64_t* c = c_t->flat<int64_t>().data();
    const u64 lift = u64{1} << attrs_.lift;
    ForRange(ctx, n, 6, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) {
        c[e] = Signed(Word(a, e) + Word(b, e) + lift + Word(r0, e));
      }
    });
  }

 private:
  TruncAttrs attrs_;
  int64_t offset_;
};

// ---------------------------------------------------------------------------------------
// P1, round 1: its share of x' masked with r1 (the dealer's).

class PkTruncOpenOp : public OpKernel {
 public:
  explicit PkTruncOpenOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x2_t = ctx->input(0);
    const Tensor& deal_t = ctx->input(1);
    const int64_t n = x2_t.NumElements();
    OP_REQUIRES_OK(ctx, CheckShape("PkTruncOpen", "the dealer message", deal_t,
                                   WithRows(kDealRows, x2_t.shape())));
    Tensor* c1_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x2_t.shape(), &c1_t));
    const int64_t* x2 = x2_t.flat<int64_t>().data();
    const int64_t* deal = deal_t.flat<int64_t>().data();  // row 0: r1
    int64_t* c1 = c1_t->flat<int64_t>().data();
    ForRange(ctx, n, 3, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) c1[e] = Signed(Word(x2, e) + Word(deal, e));
    });
  }
};

// ---------------------------------------------------------------------------------------
// P1, round 2: open c, its share of y, masked.

class PkTruncReplyOp : public OpKernel {
 public:
  explicit PkTruncReplyOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, attrs_.Read(ctx, true, false));
    OP_REQUIRES_OK(ctx, ReadOffset(ctx, "offset", &offset_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x2_t = ctx->input(0);
    const Tensor& deal_t = ctx->input(1);
    const Tensor& c0_t = ctx->input(2);
    const Tensor& f = ctx->input(3);
    const int64_t n = x2_t.NumElements();
    OP_REQUIRES_OK(ctx, CheckShape("PkTruncReply", "the dealer message", deal_t,
                                   WithRows(kDealRows, x2_t.shape())));
    OP_REQUIRES_OK(ctx, CheckShape("PkTruncReply", "c0", c0_t, x2_t.shape()));
    OP_REQUIRES_OK(ctx, CheckStream("PkTruncReply", "f_next", f, offset_, kHighRows * n));
    Tensor* t1_t = nullptr;
    Tensor* y2_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x2_t.shape(), &t1_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, x2_t.shape(), &y2_t));
    const int64_t* x2 = x2_t.flat<int64_t>().data();
    const int64_t* deal = deal_t.flat<int64_t>().data();
    const int64_t* c0 = c0_t.flat<int64_t>().data();
    const int64_t* hi = f.flat<int64_t>().data() + offset_;
    int64_t* t1 = t1_t->flat<int64_t>().data();
    int64_t* y2 = y2_t->flat<int64_t>().data();
    const TruncAttrs at = attrs_;
    const u64 top = at.Top();
    ForRange(ctx, n, 16, [&](int64_t lo, int64_t hi_e) {
      for (int64_t e = lo; e < hi_e; ++e) {
        const u64 c1 = Word(x2, e) + Word(deal, e);
        const u64 c = Word(c0, e) + c1;
        const u64 s1 = Word(deal, n + e), m1 = Word(deal, 2 * n + e);
        const u64 b1 = (c >> 63) ? u64{0} - m1 : m1;
        const u64 yp1 = (b1 << top) - s1;
        t1[e] = Signed(yp1 - Word(hi, e));  // t1 = y'1 - y2
        y2[e] = hi[e];
      }
    });
  }

 private:
  TruncAttrs attrs_;
  int64_t offset_;
};

// ---------------------------------------------------------------------------------------
// P0, round 2: open c, its share of y, masked; its share y0 - 2^(lift - amount).

class PkTruncFinishOp : public OpKernel {
 public:
  explicit PkTruncFinishOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, attrs_.Read(ctx, true, true));
    OP_REQUIRES_OK(ctx, ReadOffset(ctx, "offset", &offset_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& c0_t = ctx->input(0);
    const Tensor& c1_t = ctx->input(1);
    const Tensor& f = ctx->input(2);
    const int64_t n = c0_t.NumElements();
    OP_REQUIRES_OK(ctx, CheckShape("PkTruncFinish", "c1", c1_t, c0_t.shape()));
    OP_REQUIRES_OK(ctx, CheckStream("PkTruncFinish", "f_prev", f, offset_, kLowRows * n));
    Tensor* t0_t = nullptr;
    Tensor* own_t = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, c0_t.shape(), &t0_t));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, c0_t.shape(), &own_t));
    const int64_t* c0 = c0_t.flat<int64_t>().data();
    const int64_t* c1 = c1_t.flat<int64_t>().data();
    const int64_t* lo = f.flat<int64_t>().data() + offset_;
    int64_t* t0 = t0_t->flat<int64_t>().data();
    int64_t* y0 = own_t->flat<int64_t>().data();
    const TruncAttrs at = attrs_;
    const u64 top = at.Top(), unlift = at.Unlift();
    ForRange(ctx, n, 16, [&](int64_t a, int64_t b) {
      for (int64_t e = a; e < b; ++e) {
        const u64 c = Word(c0, e) + Word(c1, e);
        const u64 s0 = Word(lo, n + e), m0 = Word(lo, 2 * n + e), y = Word(lo, 3 * n + e);
        const u64 b0 = (c >> 63) ? u64{1} - m0 : m0;
        const u64 yp0 = at.Cprime(c) - s0 + (b0 << top);
        const u64 tv = yp0 - y;  // t0 = y'0 - y0
        t0[e] = Signed(tv);
        y0[e] = Signed(y - unlift);
      }
    });
  }

 private:
  TruncAttrs attrs_;
  int64_t offset_;
};

// Shape functions.
// The input `input` must be [rows] + the shape of input `like`.
Status MergeRows(InferenceContext* c, int rows, int input, int like) {
  ShapeHandle want, merged;
  TF_RETURN_IF_ERROR(RowsOf(c, rows, like, &want));
  return c->Merge(c->input(input), want, &merged);
}

}  // namespace

REGISTER_OP("PkTruncDeal")
    .Input("r: int64")
    .Input("f_prev: int64")
    .Input("f_next: int64")
    .Output("deal: int64")
    .Output("y_own: int64")
    .Output("y_next: int64")
    .Attr("amount: int")
    .Attr("lift: int = 62")
    .Attr("offset_prev: int = 0")
    .Attr("offset_next: int = 0")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle deal;
      TF_RETURN_IF_ERROR(RowsOf(c, kDealRows, 0, &deal));
      c->set_output(0, deal);
      c->set_output(1, c->input(0));
      c->set_output(2, c->input(0));
      return Status();
    });

REGISTER_OP("PkTruncMask")
    .Input("x_own: int64")
    .Input("x_next: int64")
    .Input("f_prev: int64")
    .Output("c0: int64")
    .Attr("lift: int = 62")
    .Attr("offset: int = 0")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle merged;
      TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(1), &merged));
      c->set_output(0, merged);
      return Status();
    });

REGISTER_OP("PkTruncOpen")
    .Input("x_next: int64")
    .Input("deal: int64")
    .Output("c1: int64")
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(MergeRows(c, kDealRows, 1, 0));
      c->set_output(0, c->input(0));
      return Status();
    });

REGISTER_OP("PkTruncReply")
    .Input("x_next: int64")
    .Input("deal: int64")
    .Input("c0: int64")
    .Input("f_next: int64")
    .Output("t1: int64")
    .Output("y_next: int64")
    .Attr("amount: int")
    .Attr("offset: int = 0")
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(MergeRows(c, kDealRows, 1, 0));
      ShapeHandle merged;
      TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(2), &merged));
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(0));
      return Status();
    });

REGISTER_OP("PkTruncFinish")
    .Input("c0: int64")
    .Input("c1: int64")
    .Input("f_prev: int64")
    .Output("t0: int64")
    .Output("y_own: int64")
    .Attr("amount: int")
    .Attr("lift: int = 62")
    .Attr("offset: int = 0")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle merged;
      TF_RETURN_IF_ERROR(c->Merge(c->input(0), c->input(1), &merged));
      c->set_output(0, merged);
      c->set_output(1, merged);
      return Status();
    });

REGISTER_KERNEL_BUILDER(Name("PkTruncDeal").Device(DEVICE_CPU), PkTruncDealOp);
REGISTER_KERNEL_BUILDER(Name("PkTruncMask").Device(DEVICE_CPU), PkTruncMaskOp);
REGISTER_KERNEL_BUILDER(Name("PkTruncOpen").Device(DEVICE_CPU), PkTruncOpenOp);
REGISTER_KERNEL_BUILDER(Name("PkTruncReply").Device(DEVICE_CPU), PkTruncReplyOp);
REGISTER_KERNEL_BUILDER(Name("PkTruncFinish").Device(DEVICE_CPU), PkTruncFinishOp);
