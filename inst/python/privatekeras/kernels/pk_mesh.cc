// privatekeras mesh transport: the three workers' protocol messages travel on our own
// sockets ("the mesh") instead of TensorFlow's distributed Send/Recv.
//
// Each worker runs its own part of the traced step in its own process; where a tensor
// crosses from worker a to worker b the step has PkMeshSend on a and PkMeshRecv on b. Each
// worker process holds one connected, authenticated stream socket to each of its two peers
// (Python sets them up and hands their fds to pk_mesh_attach below).
//
//   PkMeshSend(step, x; T, peer, edge)              writes one frame to worker `peer`
//   PkMeshRecv(step; T, peer, edge, shape) -> y      the frame (peer, step, edge) from `peer`
//
// A message is named by (peer, step, edge): the worker it comes from, the step it belongs to
// and the graph edge it carries. The two ends agree on step and edge; nothing else pairs them.
//
// Frame (little-endian; header and payload written back to back under the link's send lock,
// so frames never interleave):
//
//   magic   uint32  0x314D4B50 ("PKM1")
//   dtype   uint32  TensorFlow DataType: a fixed-width integer (8 to 64 bits, signed or not)
//                   or bool
//   step    int64
//   edge    int64
//   rank    uint32  <= 8
//   dims    int64[rank]
//   bytes   uint64  = elements * dtype size (<= 1 GiB)
//   payload the tensor's flat bytes
//
// Per peer a reader thread reads frames (blocking reads, no polling loops with sleeps) straight
// into a newly allocated Tensor (the payload's one copy on the receiving side; the sender
// writes from the input tensor's buffer, its one copy). A frame whose receive is already
// waiting completes it on the reader thread; any other waits in the inbox until its receive
// comes. A closed link or a malformed frame marks the link failed, closes the socket and fails
// every receive waiting on that peer (Unavailable); later sends and receives on it fail at once.
//
// Steps are sequential and their ids increase: a receive for step s from peer p drops p's
// inbox messages of older steps, and fails p's receives still waiting for an older step
// (Aborted, "superseded"). Messages of older steps that arrive later are dropped on arrival.
//
// Nothing waits forever: a receive waits at most the configured timeout (a watchdog thread
// sleeps until the earliest deadline and fails expired receives with DeadlineExceeded), a send
// waits at most the timeout for its peer to be attached and for its bytes to be taken, and a
// cancelled step completes its receives with Cancelled.
//
// The C API at the end (pk_mesh_attach, pk_mesh_set_timeout, pk_mesh_attached, pk_mesh_close,
// pk_mesh_pending) is what privatekeras.kernels.mesh calls through ctypes on the same library.
//
// Built into pk_ops.so by privatekeras.kernels.build().

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "pk_common.h"
#include "tensorflow/core/framework/cancellation.h"
#include "tensorflow/core/framework/types.h"

namespace privatekeras {
namespace {

using Clock = std::chrono::steady_clock;
using tensorflow::AsyncOpKernel;
using tensorflow::CancellationManager;
using tensorflow::CancellationToken;
using tensorflow::DataType;
using tensorflow::DataTypeString;
using tensorflow::PartialTensorShape;
using tensorflow::strings::StrCat;
namespace errors = tensorflow::errors;

constexpr int kParties = 3;
constexpr uint32_t kMagic = 0x314D4B50;  // "PKM1" read as a little-endian uint32
constexpr uint32_t kMaxRank = 8;
constexpr uint64_t kMaxPayload = uint64_t{1} << 30;  // 1 GiB
constexpr size_t kFixedHeader = 4 + 4 + 8 + 8 + 4;   // magic, dtype, step, edge, rank
constexpr size_t kMaxHeader = kFixedHeader + 8 * kMaxRank + 8;
constexpr double kMinTimeout = 1e-3;  // seconds; the configured timeout is clamped to
constexpr double kMaxTimeout = 1e7;   // [kMinTimeout, kMaxTimeout] (no clock overflow)

// The dtypes a frame may carry (the ops' T constraint says the same).
bool Allowed(uint32_t dtype) {
  switch (dtype) {
    case tensorflow::DT_INT64:
    case tensorflow::DT_INT32:
    case tensorflow::DT_INT16:
    case tensorflow::DT_INT8:
    case tensorflow::DT_UINT8:
    case tensorflow::DT_UINT16:
    case tensorflow::DT_UINT32:
    case tensorflow::DT_BOOL:
    case tensorflow::DT_UINT64:
      return true;
    default:
      return false;
  }
}

// Little-endian encoding, byte by byte (independent of the host's byte order).
void PutU32(char* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<char>(v >> (8 * i));
}
void PutU64(char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<char>(v >> (8 * i));
}
uint64_t GetU64(const char* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= uint64_t{static_cast<unsigned char>(p[i])} << (8 * i);
  return v;
}
uint32_t GetU32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t{static_cast<unsigned char>(p[i])} << (8 * i);
  return v;
}

Clock::duration Seconds(double s) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

std::string ErrnoText(int err) { return std::strerror(err); }

// "worker 1 (step 7, edge 3)": how messages are named in errors.
std::string Where(int peer, int64_t step, int64_t edge) {
  return StrCat("worker ", peer, " (step ", step, ", edge ", edge, ")");
}

// A message's name: (peer it comes from, step, edge). Maps keyed by it are ordered by peer,
// then step, so one peer's older steps are a contiguous range.
using Key = std::tuple<int, int64_t, int64_t>;
constexpr int64_t kLowest = std::numeric_limits<int64_t>::min();

// What a receive does once its message or its failure is known: check the message against the
// op's T and shape, set the output or the error, call the kernel's done callback.
using Finish = std::function<void(Status, Tensor)>;

// A receive whose message has not arrived yet.
struct Waiter {
  uint64_t id = 0;                  // tells a waiter from a later one under the same key
  Clock::time_point deadline;
  double timeout = 0;               // seconds, for the DeadlineExceeded message
  CancellationManager* cm = nullptr;  // where its cancellation callback is registered, if any
  CancellationToken token = CancellationManager::kInvalidToken;
  Finish finish;
};

// A waiter taken out of the map (under the lock) and the outcome to finish it with (outside).
struct Completion {
  Waiter waiter;
  Status status;
  Tensor value;
};

// Finishes taken waiters. Deregisters each one's cancellation callback first (a callback that
// already ran found no waiter and did nothing); never called with the state lock held.
void Complete(std::vector<Completion>* list) {
  for (Completion& c : *list) {
    if (c.waiter.cm != nullptr) c.waiter.cm->DeregisterCallback(c.waiter.token);
    c.waiter.finish(c.status, std::move(c.value));
  }
  list->clear();
}

// One peer's link.
struct Link {
  int fd = -1;            // the socket (owned); -1 before attach and once closed
  bool attached = false;  // pk_mesh_attach took a socket for this peer (until pk_mesh_close)
  std::string failure;    // why the link failed; empty while healthy
  bool has_floor = false;
  int64_t floor = 0;      // the newest step a receive from this peer was issued for
  std::mutex send_mu;     // one frame at a time; also held while the fd is closed
  std::thread reader;
};

// ---------------------------------------------------------------------------------------
// The process-wide mesh state. One mutex (mu_) guards everything but the blocking socket I/O.
// Lock order: a link's send_mu before mu_. Done callbacks and cancellation deregistration run
// with no lock held.

class Mesh {
 public:
  // The one instance; never destroyed (threads may still run while the process exits, so
  // there must be no destructor racing them; privatekeras.kernels.mesh closes it at exit).
  static Mesh& Get() {
    static Mesh* mesh = new Mesh();
    return *mesh;
  }

  // Takes the socket fd for link `peer` (closes it when refused); starts its reader.
  Status Attach(int peer, int fd) {
    if (peer < 0 || peer >= kParties) {
      ::close(fd);
      return errors::InvalidArgument("pk_mesh_attach: peer must be 0, 1 or 2, got ", peer);
    }
    int type = 0;
    socklen_t len = sizeof(type);
    if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0) {
      const int err = errno;
      ::close(fd);
      return errors::InvalidArgument("pk_mesh_attach: fd ", fd, " for worker ", peer,
                                     " is not a socket (", ErrnoText(err), ")");
    }
    if (type != SOCK_STREAM) {
      ::close(fd);
      return errors::InvalidArgument("pk_mesh_attach: fd ", fd, " for worker ", peer,
                                     " is not a stream socket");
    }
    sockaddr_storage addr;
    socklen_t addr_len = sizeof(addr);
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &addr_len) == 0 &&
        (addr.ss_family == AF_INET || addr.ss_family == AF_INET6)) {
      const int one = 1;
      ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));  // best effort
    }
    std::lock_guard<std::mutex> l(mu_);
    Link& link = links_[peer];
    if (closing_ || link.attached) {
      ::close(fd);
      if (closing_) return errors::Unavailable("pk_mesh_attach: the mesh is being closed");
      return errors::AlreadyExists(
          "pk_mesh_attach: worker ", peer, " is already attached to the mesh",
          link.failure.empty() ? "" : StrCat(" (its link failed: ", link.failure, ")"),
          "; call pk_mesh_close() before attaching again");
    }
    try {
      link.reader = std::thread(&Mesh::ReadLoop, this, peer, fd, generation_);
    } catch (const std::system_error& e) {
      ::close(fd);
      return errors::ResourceExhausted("pk_mesh_attach: could not start the reader thread "
                                       "for worker ", peer, ": ", e.what());
    }
    link.fd = fd;
    link.attached = true;
    link.failure.clear();
    link.has_floor = false;
    attached_cv_.notify_all();
    return Status();
  }

  void SetTimeout(double seconds) {
    if (!(seconds >= kMinTimeout)) seconds = kMinTimeout;  // also NaN
    if (seconds > kMaxTimeout) seconds = kMaxTimeout;
    std::lock_guard<std::mutex> l(mu_);
    timeout_ = seconds;
  }

  // 1 attached and healthy, 0 not attached yet, -1 failed (or not a peer index).
  int Attached(int peer) {
    if (peer < 0 || peer >= kParties) return -1;
    std::lock_guard<std::mutex> l(mu_);
    const Link& link = links_[peer];
    if (!link.failure.empty()) return -1;
    return link.attached ? 1 : 0;
  }

  int Pending() {
    std::lock_guard<std::mutex> l(mu_);
    return static_cast<int>(inbox_.size() + waiters_.size());
  }

  // Shuts every link down, joins the reader and watchdog threads, fails every waiting receive
  // with Cancelled and forgets all messages; afterwards peers can be attached again.
  void Close() {
    std::lock_guard<std::mutex> serial(close_mu_);
    std::vector<Completion> cancelled;
    std::vector<std::thread> threads;
    {
      std::lock_guard<std::mutex> l(mu_);
      closing_ = true;
      ++generation_;
      TakeAllWaiters(&cancelled);
      inbox_.clear();
      for (Link& link : links_) {
        if (link.fd >= 0) ::shutdown(link.fd, SHUT_RDWR);  // wakes its reader and senders
        if (link.reader.joinable()) threads.push_back(std::move(link.reader));
      }
      stop_watch_ = true;
      if (watch_thread_.joinable()) threads.push_back(std::move(watch_thread_));
    }
    attached_cv_.notify_all();
    watch_cv_.notify_all();
    Complete(&cancelled);
    for (std::thread& t : threads) t.join();  // each reader closes its own fd on the way out
    {
      std::lock_guard<std::mutex> l(mu_);
      for (Link& link : links_) {
        link.attached = false;
        link.failure.clear();
        link.has_floor = false;
      }
      inbox_.clear();
      stop_watch_ = false;
      watch_next_ = Clock::time_point::max();
      closing_ = false;
    }
  }

  // Writes x as frame (step, edge) to worker `peer`. Waits (up to the timeout) for the peer to
  // be attached and for the socket to take the bytes.
  Status Send(int peer, int64_t step, int64_t edge, const Tensor& x) {
    Link& link = links_[peer];
    double timeout;
    uint64_t generation;
    {
      std::unique_lock<std::mutex> l(mu_);
      timeout = timeout_;
      generation = generation_;
      const Clock::time_point deadline = Clock::now() + Seconds(timeout);
      while (!link.attached && !closing_ && generation_ == generation) {
        if (attached_cv_.wait_until(l, deadline) == std::cv_status::timeout &&
            !link.attached) {
          return errors::DeadlineExceeded("PkMeshSend to ", Where(peer, step, edge),
                                          ": worker ", peer, " was not attached to the mesh "
                                          "within ", timeout, " s");
        }
      }
      if (closing_ || generation_ != generation) {
        return errors::Cancelled("PkMeshSend to ", Where(peer, step, edge),
                                 ": the mesh was closed");
      }
      if (!link.failure.empty()) {
        return errors::Unavailable("PkMeshSend to ", Where(peer, step, edge), ": ",
                                   link.failure);
      }
    }
    char header[kMaxHeader];
    const absl::string_view payload = x.tensor_data();
    const size_t header_len = EncodeHeader(header, x, step, edge, payload.size());
    Status status;
    std::string broken;  // set when the link cannot carry another frame
    {
      std::lock_guard<std::mutex> s(link.send_mu);
      int fd;
      {
        std::lock_guard<std::mutex> l(mu_);
        if (!link.failure.empty()) {
          return errors::Unavailable("PkMeshSend to ", Where(peer, step, edge), ": ",
                                     link.failure);
        }
        if (generation_ != generation || link.fd < 0) {
          return errors::Cancelled("PkMeshSend to ", Where(peer, step, edge),
                                   ": the mesh was closed");
        }
        fd = link.fd;  // stays open while send_mu is held (see CloseFd)
      }
      status = WriteFrame(peer, fd, header, header_len, payload, timeout, &broken);
    }
    if (!broken.empty()) FailPeer(peer, generation, broken);
    if (!status.ok()) {
      return Status(status.code(),
                    StrCat("PkMeshSend to ", Where(peer, step, edge), ": ", status.message()));
    }
    return Status();
  }

  // Receives frame (peer, step, edge): finishes at once when it is in the inbox (or the link
  // failed), else registers a waiter that the reader, the watchdog, cancellation or Close
  // finishes.
  void Receive(int peer, int64_t step, int64_t edge, CancellationManager* cm, Finish finish) {
    const Key key(peer, step, edge);
    std::vector<Completion> superseded;
    std::unique_lock<std::mutex> l(mu_);
    if (closing_) {
      l.unlock();
      finish(errors::Cancelled("PkMeshRecv from ", Where(peer, step, edge),
                               ": the mesh is being closed"),
             Tensor());
      return;
    }
    Link& link = links_[peer];
    if (link.has_floor && step < link.floor) {
      const int64_t newer = link.floor;
      l.unlock();
      finish(errors::Aborted("PkMeshRecv from ", Where(peer, step, edge),
                             ": superseded by step ", newer),
             Tensor());
      return;
    }
    if (!link.has_floor || step > link.floor) {
      link.has_floor = true;
      link.floor = step;
      inbox_.erase(inbox_.lower_bound(Key(peer, kLowest, kLowest)),
                   inbox_.lower_bound(Key(peer, step, kLowest)));
      auto first = waiters_.lower_bound(Key(peer, kLowest, kLowest));
      auto last = waiters_.lower_bound(Key(peer, step, kLowest));
      for (auto it = first; it != last; ++it) {
        superseded.push_back(Completion{
            std::move(it->second),
            errors::Aborted("PkMeshRecv from ", Where(peer, std::get<1>(it->first),
                                                      std::get<2>(it->first)),
                            ": superseded by step ", step),
            Tensor()});
      }
      waiters_.erase(first, last);
    }
    auto found = inbox_.find(key);
    if (found != inbox_.end()) {
      Tensor value = std::move(found->second);
      inbox_.erase(found);
      l.unlock();
      Complete(&superseded);
      finish(Status(), std::move(value));
      return;
    }
    Status refuse;
    if (!link.failure.empty()) {
      refuse = errors::Unavailable("PkMeshRecv from ", Where(peer, step, edge), ": ",
                                   link.failure);
    } else if (waiters_.count(key) != 0) {
      refuse = errors::AlreadyExists("PkMeshRecv from ", Where(peer, step, edge),
                                     ": another receive is already waiting for this message");
    } else {
      Waiter w;
      w.id = ++next_id_;
      w.timeout = timeout_;
      w.deadline = Clock::now() + Seconds(timeout_);
      w.finish = std::move(finish);
      if (cm != nullptr) {
        // Registered under mu_ (as CancellationManager recommends): the callback takes mu_,
        // and a cancellation that already started makes RegisterCallback return false.
        const CancellationToken token = cm->get_cancellation_token();
        const uint64_t id = w.id;
        if (cm->RegisterCallback(token, [this, key, id]() { Cancel(key, id); })) {
          w.cm = cm;
          w.token = token;
        } else {
          refuse = errors::Cancelled("PkMeshRecv from ", Where(peer, step, edge),
                                     ": the step was cancelled");
          finish = std::move(w.finish);
        }
      }
      if (refuse.ok() && !StartWatchdog()) {
        // Without a watchdog the receive could wait forever: refuse it instead.
        if (w.cm != nullptr) cm->TryDeregisterCallback(w.token);
        refuse = errors::ResourceExhausted("PkMeshRecv from ", Where(peer, step, edge),
                                           ": could not start the mesh watchdog thread");
        finish = std::move(w.finish);
      }
      if (refuse.ok()) {
        const Clock::time_point deadline = w.deadline;
        waiters_.emplace(key, std::move(w));
        if (deadline < watch_next_) watch_cv_.notify_one();
        l.unlock();
        Complete(&superseded);
        return;
      }
    }
    l.unlock();
    Complete(&superseded);
    finish(refuse, Tensor());
  }

 private:
  Mesh() = default;

  // Fills header with the frame header of x; returns its length.
  static size_t EncodeHeader(char* header, const Tensor& x, int64_t step, int64_t edge,
                             size_t bytes) {
    PutU32(header, kMagic);
    PutU32(header + 4, static_cast<uint32_t>(x.dtype()));
    PutU64(header + 8, static_cast<uint64_t>(step));
    PutU64(header + 16, static_cast<uint64_t>(edge));
    PutU32(header + 24, static_cast<uint32_t>(x.dims()));
    size_t at = kFixedHeader;
    for (int d = 0; d < x.dims(); ++d, at += 8) {
      PutU64(header + at, static_cast<uint64_t>(x.dim_size(d)));
    }
    PutU64(header + at, static_cast<uint64_t>(bytes));
    return at + 8;
  }

  // Writes header + payload (no copy of the payload: one gathered write, continued after
  // partial writes). The socket may be non-blocking (a Python socket with a timeout shares
  // the file's flags): every write is non-blocking and waits in poll() for room, up to the
  // timeout. Sets *broken when the link can carry no further frame.
  static Status WriteFrame(int peer, int fd, const char* header, size_t header_len,
                           absl::string_view payload, double timeout, std::string* broken) {
    const size_t total = header_len + payload.size();
    const Clock::time_point deadline = Clock::now() + Seconds(timeout);
    size_t sent = 0;
    while (sent < total) {
      iovec iov[2];
      int n_iov = 0;
      if (sent < header_len) {
        iov[n_iov].iov_base = const_cast<char*>(header + sent);
        iov[n_iov++].iov_len = header_len - sent;
        if (!payload.empty()) {
          iov[n_iov].iov_base = const_cast<char*>(payload.data());
          iov[n_iov++].iov_len = payload.size();
        }
      } else {
        const size_t done = sent - header_len;
        iov[n_iov].iov_base = const_cast<char*>(payload.data() + done);
        iov[n_iov++].iov_len = payload.size() - done;
      }
      msghdr msg;
      std::memset(&msg, 0, sizeof(msg));
      msg.msg_iov = iov;
      msg.msg_iovlen = n_iov;
      const ssize_t n = ::sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        sent += static_cast<size_t>(n);
        continue;
      }
      const int err = n < 0 ? errno : EPIPE;
      if (err == EINTR) continue;
      if (err == EAGAIN || err == EWOULDBLOCK) {
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            deadline - Clock::now()).count();
        if (left <= 0) {
          if (sent > 0) {
            *broken = StrCat("the mesh link to worker ", peer, " stalled: worker ", peer,
                             " took no bytes for ", timeout, " s in the middle of a frame");
          }
          return errors::DeadlineExceeded("worker ", peer, " did not take the message "
                                          "within ", timeout, " s");
        }
        pollfd p{fd, POLLOUT, 0};
        if (::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 1 << 30))) < 0 &&
            errno != EINTR) {
          const int perr = errno;
          *broken = StrCat("the mesh link to worker ", peer, " failed: poll: ",
                           ErrnoText(perr));
          return errors::Unavailable(*broken);
        }
        continue;
      }
      if (err == EPIPE || err == ECONNRESET || err == ENOTCONN || err == ESHUTDOWN) {
        *broken = StrCat("the mesh link to worker ", peer, " closed (", ErrnoText(err), ")");
      } else {
        *broken = StrCat("the mesh link to worker ", peer, " failed: send: ", ErrnoText(err));
      }
      return errors::Unavailable(*broken);
    }
    return Status();
  }

  // Reads exactly n bytes. Returns 1 when read, 0 on end of stream before the first byte,
  // -1 otherwise (*why says what happened; `mid_frame`: the bytes are not a frame's first).
  static int ReadFull(int peer, int fd, char* buf, size_t n, bool mid_frame,
                      std::string* why) {
    size_t got = 0;
    while (got < n) {
      const ssize_t r = ::recv(fd, buf + got, n - got, MSG_WAITALL);
      if (r > 0) {
        got += static_cast<size_t>(r);
        continue;
      }
      if (r == 0) {
        if (got == 0 && !mid_frame) return 0;
        *why = StrCat("the mesh link to worker ", peer, " closed in the middle of a frame");
        return -1;
      }
      const int err = errno;
      if (err == EINTR) continue;
      if (err == EAGAIN || err == EWOULDBLOCK) {  // a non-blocking fd: wait for data
        pollfd p{fd, POLLIN, 0};
        if (::poll(&p, 1, -1) < 0 && errno != EINTR) {
          const int perr = errno;
          *why = StrCat("the mesh link to worker ", peer, " failed: poll: ", ErrnoText(perr));
          return -1;
        }
        continue;
      }
      if (err == ECONNRESET || err == ENOTCONN || err == EPIPE) {
        *why = StrCat("the mesh link to worker ", peer, " closed (", ErrnoText(err), ")");
      } else {
        *why = StrCat("the mesh link to worker ", peer, " failed: recv: ", ErrnoText(err));
      }
      return -1;
    }
    return 1;
  }

  // The reader thread of link `peer` (attached in `generation`): reads frames until the link
  // ends, then marks it failed (fails its waiters) and closes the socket.
  void ReadLoop(int peer, int fd, uint64_t generation) {
    const std::string why = ReadFrames(peer, fd);
    FailPeer(peer, generation, why);
    CloseFd(peer);
  }

  // Reads and delivers frames; returns why it stopped.
  std::string ReadFrames(int peer, int fd) {
    const auto malformed = [peer](const std::string& what) {
      return StrCat("worker ", peer, " sent a malformed mesh frame: ", what);
    };
    char head[kMaxHeader];
    std::string why;
    for (;;) {
      const int r = ReadFull(peer, fd, head, kFixedHeader, false, &why);
      if (r == 0) return StrCat("the mesh link to worker ", peer, " closed");
      if (r < 0) return why;
      const uint32_t magic = GetU32(head);
      const uint32_t dtype = GetU32(head + 4);
      const int64_t step = static_cast<int64_t>(GetU64(head + 8));
      const int64_t edge = static_cast<int64_t>(GetU64(head + 16));
      const uint32_t rank = GetU32(head + 24);
      if (magic != kMagic) {
        char hex[16];
        std::snprintf(hex, sizeof(hex), "0x%08X", magic);
        return malformed(StrCat("bad magic ", hex, " (expected 0x314D4B50)"));
      }
      if (!Allowed(dtype)) return malformed(StrCat("dtype ", dtype, " is not allowed"));
      if (rank > kMaxRank) return malformed(StrCat("rank ", rank, " > ", kMaxRank));
      if (ReadFull(peer, fd, head + kFixedHeader, 8 * rank + 8, true, &why) < 0) return why;
      int64_t dims[kMaxRank];
      for (uint32_t d = 0; d < rank; ++d) {
        dims[d] = static_cast<int64_t>(GetU64(head + kFixedHeader + 8 * d));
        if (dims[d] < 0) return malformed(StrCat("negative dimension ", dims[d]));
      }
      const uint64_t bytes = GetU64(head + kFixedHeader + 8 * rank);
      const DataType type = static_cast<DataType>(dtype);
      const uint64_t size = static_cast<uint64_t>(tensorflow::DataTypeSize(type));
      // The element count, refusing anything past the payload bound before it overflows.
      uint64_t elements = 1;
      for (uint32_t d = 0; d < rank; ++d) {
        const uint64_t dim = static_cast<uint64_t>(dims[d]);
        if (dim != 0 && elements > kMaxPayload / size / dim) {
          return malformed(StrCat("a tensor of more than ", kMaxPayload, " bytes"));
        }
        elements *= dim;
      }
      if (bytes != elements * size) {
        return malformed(StrCat("payload of ", bytes, " bytes for ", elements, " ",
                                DataTypeString(type), " elements"));
      }
      TensorShape shape;
      Status built = TensorShape::BuildTensorShape(absl::Span<const int64_t>(dims, rank),
                                                   &shape);
      if (!built.ok()) return malformed(std::string(built.message()));
      Tensor value(type, shape);
      if (!value.IsInitialized()) {
        return StrCat("the mesh link to worker ", peer, " failed: could not allocate ",
                      bytes, " bytes for ", Where(peer, step, edge));
      }
      if (bytes > 0 &&
          ReadFull(peer, fd, static_cast<char*>(value.data()), bytes, true, &why) < 0) {
        return why;
      }
      if (type == tensorflow::DT_BOOL) {
        const unsigned char* b = static_cast<const unsigned char*>(value.data());
        for (uint64_t i = 0; i < bytes; ++i) {
          if (b[i] > 1) return malformed(StrCat("bool element ", i, " is ", int{b[i]}));
        }
      }
      const std::string refused = Deliver(peer, step, edge, std::move(value));
      if (!refused.empty()) return malformed(refused);
    }
  }

  // Hands a received message to its waiting receive, or keeps it in the inbox. Returns why the
  // message breaks the protocol (empty when it does not).
  std::string Deliver(int peer, int64_t step, int64_t edge, Tensor value) {
    const Key key(peer, step, edge);
    std::unique_lock<std::mutex> l(mu_);
    const Link& link = links_[peer];
    if (link.has_floor && step < link.floor) return std::string();  // stale: dropped
    auto w = waiters_.find(key);
    if (w != waiters_.end()) {
      std::vector<Completion> done;
      done.push_back(Completion{std::move(w->second), Status(), std::move(value)});
      waiters_.erase(w);
      l.unlock();
      Complete(&done);
      return std::string();
    }
    if (!inbox_.emplace(key, std::move(value)).second) {
      return StrCat("step ", step, " edge ", edge, " arrived twice");
    }
    return std::string();
  }

  // Marks link `peer` failed (the first reason stays), shuts its socket down (waking its
  // reader and senders) and fails the receives waiting on it. Ignored when the mesh was closed
  // since `generation` (a sender that saw pk_mesh_close's shutdown must not fail a link
  // attached after it).
  void FailPeer(int peer, uint64_t generation, const std::string& why) {
    std::vector<Completion> failed;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (generation != generation_) return;
      Link& link = links_[peer];
      if (link.failure.empty()) link.failure = why;
      if (link.fd >= 0) ::shutdown(link.fd, SHUT_RDWR);
      auto first = waiters_.lower_bound(Key(peer, kLowest, kLowest));
      auto last = waiters_.lower_bound(Key(peer + 1, kLowest, kLowest));
      for (auto it = first; it != last; ++it) {
        failed.push_back(Completion{
            std::move(it->second),
            errors::Unavailable("PkMeshRecv from ", Where(peer, std::get<1>(it->first),
                                                          std::get<2>(it->first)),
                                ": ", link.failure),
            Tensor()});
      }
      waiters_.erase(first, last);
    }
    Complete(&failed);
  }

  // Closes link `peer`'s socket once no sender is using it (a sender holds send_mu while it
  // writes; the shutdown before this has woken any blocked one).
  void CloseFd(int peer) {
    Link& link = links_[peer];
    std::lock_guard<std::mutex> s(link.send_mu);
    int fd;
    {
      std::lock_guard<std::mutex> l(mu_);
      fd = link.fd;
      link.fd = -1;
    }
    if (fd >= 0) ::close(fd);
  }

  // The cancellation callback of waiter `id`: finishes it with Cancelled unless someone else
  // has already taken it. Runs inside CancellationManager::StartCancel (so no deregistering).
  void Cancel(const Key& key, uint64_t id) {
    Waiter w;
    {
      std::lock_guard<std::mutex> l(mu_);
      auto it = waiters_.find(key);
      if (it == waiters_.end() || it->second.id != id) return;
      w = std::move(it->second);
      waiters_.erase(it);
    }
    w.finish(errors::Cancelled("PkMeshRecv from ", Where(std::get<0>(key), std::get<1>(key),
                                                         std::get<2>(key)),
                               ": the step was cancelled"),
             Tensor());
  }

  // Moves every waiter into *out with Cancelled (mu_ held).
  void TakeAllWaiters(std::vector<Completion>* out) {
    for (auto& [key, w] : waiters_) {
      out->push_back(Completion{
          std::move(w),
          errors::Cancelled("PkMeshRecv from ", Where(std::get<0>(key), std::get<1>(key),
                                                      std::get<2>(key)),
                            ": the mesh was closed"),
          Tensor()});
    }
    waiters_.clear();
  }

  // Starts the watchdog thread if it is not running (mu_ held); false when it cannot.
  bool StartWatchdog() {
    if (watch_thread_.joinable()) return true;
    try {
      watch_thread_ = std::thread(&Mesh::WatchLoop, this);
    } catch (const std::system_error&) {
      return false;
    }
    return true;
  }

  // The watchdog: sleeps until the earliest waiter's deadline (or until woken for an earlier
  // one, or to stop) and fails the expired waiters with DeadlineExceeded.
  void WatchLoop() {
    std::unique_lock<std::mutex> l(mu_);
    while (!stop_watch_) {
      const Clock::time_point now = Clock::now();
      Clock::time_point next = Clock::time_point::max();
      std::vector<Completion> expired;
      for (auto it = waiters_.begin(); it != waiters_.end();) {
        if (it->second.deadline <= now) {
          const auto& [peer, step, edge] = it->first;
          const double timeout = it->second.timeout;
          expired.push_back(Completion{
              std::move(it->second),
              errors::DeadlineExceeded("PkMeshRecv: no message from worker ", peer,
                                       " for step ", step, " edge ", edge, " within ",
                                       timeout, " s"),
              Tensor()});
          it = waiters_.erase(it);
        } else {
          next = std::min(next, it->second.deadline);
          ++it;
        }
      }
      if (!expired.empty()) {
        l.unlock();
        Complete(&expired);
        l.lock();
        continue;  // rescan: waiters may have come and gone meanwhile
      }
      watch_next_ = next;
      if (next == Clock::time_point::max()) {
        watch_cv_.wait(l);
      } else {
        watch_cv_.wait_until(l, next);
      }
      watch_next_ = Clock::time_point::max();
    }
  }

  std::mutex close_mu_;  // one pk_mesh_close at a time
  std::mutex mu_;
  Link links_[kParties];
  std::map<Key, Tensor> inbox_;
  std::map<Key, Waiter> waiters_;
  std::condition_variable attached_cv_;  // a peer was attached (or the mesh closed)
  std::condition_variable watch_cv_;     // the watchdog's wake-up
  std::thread watch_thread_;
  Clock::time_point watch_next_ = Clock::time_point::max();  // when the watchdog wakes
  bool stop_watch_ = false;
  bool closing_ = false;
  uint64_t generation_ = 0;  // counts pk_mesh_close calls
  uint64_t next_id_ = 0;
  double timeout_ = 60;  // seconds
};

// ---------------------------------------------------------------------------------------
// The ops.

// Reads and checks the attrs both ops share: peer (a party index) and edge (>= 0).
template <typename Context>
Status ReadEnds(Context* ctx, const char* op, int* peer, int64_t* edge) {
  int64_t p = 0;
  TF_RETURN_IF_ERROR(ctx->GetAttr("peer", &p));
  if (p < 0 || p >= kParties) {
    return errors::InvalidArgument(op, ": peer must be 0, 1 or 2, got ", p);
  }
  TF_RETURN_IF_ERROR(ctx->GetAttr("edge", edge));
  if (*edge < 0) return errors::InvalidArgument(op, ": edge must be >= 0, got ", *edge);
  *peer = static_cast<int>(p);
  return Status();
}

Status ReadStep(OpKernelContext* ctx, const char* op, int64_t* step) {
  const Tensor& t = ctx->input(0);
  if (!tensorflow::TensorShapeUtils::IsScalar(t.shape())) {
    return errors::InvalidArgument(op, ": step must be a scalar, got shape ",
                                   t.shape().DebugString());
  }
  *step = t.scalar<int64_t>()();
  return Status();
}

class PkMeshSendOp : public OpKernel {
 public:
  explicit PkMeshSendOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadEnds(ctx, "PkMeshSend", &peer_, &edge_));
  }

  void Compute(OpKernelContext* ctx) override {
    int64_t step = 0;
    OP_REQUIRES_OK(ctx, ReadStep(ctx, "PkMeshSend", &step));
    const Tensor& x = ctx->input(1);
    OP_REQUIRES(ctx, x.dims() <= static_cast<int>(kMaxRank),
                errors::InvalidArgument("PkMeshSend: x must have rank <= ", kMaxRank,
                                        ", got shape ", x.shape().DebugString()));
    OP_REQUIRES(ctx, x.TotalBytes() <= kMaxPayload,
                errors::InvalidArgument("PkMeshSend: x has ", x.TotalBytes(),
                                        " bytes; a mesh message holds at most ", kMaxPayload));
    OP_REQUIRES_OK(ctx, Mesh::Get().Send(peer_, step, edge_, x));
  }

 private:
  int peer_ = 0;
  int64_t edge_ = 0;
};

class PkMeshRecvOp : public AsyncOpKernel {
 public:
  explicit PkMeshRecvOp(OpKernelConstruction* ctx) : AsyncOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadEnds(ctx, "PkMeshRecv", &peer_, &edge_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("T", &dtype_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("shape", &shape_));
  }

  void ComputeAsync(OpKernelContext* ctx, DoneCallback done) override {
    int64_t step = 0;
    OP_REQUIRES_OK_ASYNC(ctx, ReadStep(ctx, "PkMeshRecv", &step), done);
    const int peer = peer_;
    const int64_t edge = edge_;
    Finish finish = [this, ctx, done, peer, step, edge](Status status, Tensor value) {
      if (status.ok()) status = Check(value, peer, step, edge);
      if (status.ok()) {
        ctx->set_output(0, value);
      } else {
        ctx->SetStatus(status);
      }
      done();
    };
    Mesh::Get().Receive(peer, step, edge, ctx->cancellation_manager(), std::move(finish));
  }

 private:
  // The message must be of the op's T and match its shape attr where that is known.
  Status Check(const Tensor& value, int peer, int64_t step, int64_t edge) const {
    if (value.dtype() != dtype_) {
      return errors::InvalidArgument("PkMeshRecv from ", Where(peer, step, edge), ": worker ",
                                     peer, " sent ", DataTypeString(value.dtype()),
                                     ", the op expects ", DataTypeString(dtype_));
    }
    const PartialTensorShape got(value.shape().dim_sizes());
    if (!shape_.IsCompatibleWith(got)) {
      return errors::InvalidArgument("PkMeshRecv from ", Where(peer, step, edge), ": worker ",
                                     peer, " sent shape ", value.shape().DebugString(),
                                     ", the op's shape attr is ", shape_.DebugString());
    }
    return Status();
  }

  int peer_ = 0;
  int64_t edge_ = 0;
  DataType dtype_ = tensorflow::DT_INVALID;
  PartialTensorShape shape_;
};

}  // namespace
}  // namespace privatekeras

REGISTER_OP("PkMeshSend")
    .Input("step: int64")
    .Input("x: T")
    .Attr("T: {int64, int32, int16, int8, uint8, uint16, uint32, bool, uint64}")
    .Attr("peer: int")
    .Attr("edge: int")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      int peer = 0;
      int64_t edge = 0;
      TF_RETURN_IF_ERROR(privatekeras::ReadEnds(c, "PkMeshSend", &peer, &edge));
      ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 0, &unused));
      return c->WithRankAtMost(c->input(1), privatekeras::kMaxRank, &unused);
    });

REGISTER_OP("PkMeshRecv")
    .Input("step: int64")
    .Output("y: T")
    .Attr("T: {int64, int32, int16, int8, uint8, uint16, uint32, bool, uint64}")
    .Attr("peer: int")
    .Attr("edge: int")
    .Attr("shape: shape")
    .SetIsStateful()
    .SetShapeFn([](InferenceContext* c) {
      int peer = 0;
      int64_t edge = 0;
      TF_RETURN_IF_ERROR(privatekeras::ReadEnds(c, "PkMeshRecv", &peer, &edge));
      ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 0, &unused));
      tensorflow::PartialTensorShape shape;
      TF_RETURN_IF_ERROR(c->GetAttr("shape", &shape));
      if (shape.dims() > static_cast<int>(privatekeras::kMaxRank)) {
        return tensorflow::errors::InvalidArgument("PkMeshRecv: shape must have rank <= ",
                                                   privatekeras::kMaxRank, ", got ",
                                                   shape.DebugString());
      }
      ShapeHandle out;
      TF_RETURN_IF_ERROR(c->MakeShapeFromPartialTensorShape(shape, &out));
      c->set_output(0, out);
      return Status();
    });

REGISTER_KERNEL_BUILDER(Name("PkMeshSend").Device(DEVICE_CPU), privatekeras::PkMeshSendOp);
REGISTER_KERNEL_BUILDER(Name("PkMeshRecv").Device(DEVICE_CPU), privatekeras::PkMeshRecvOp);

// ---------------------------------------------------------------------------------------
// The C API (ctypes, privatekeras.kernels.mesh).

#define PK_MESH_API extern "C" __attribute__((visibility("default")))

// Attaches the connected stream socket `fd` as the link to worker `peer` (0, 1 or 2) and
// starts its reader thread. Takes ownership of fd in every case (closes it when refused). Sets
// TCP_NODELAY on TCP sockets. Refuses a peer already attached (healthy or failed) until
// pk_mesh_close(). Returns 0, or -1 with a message in err (errlen bytes, NUL-terminated).
PK_MESH_API int pk_mesh_attach(int peer, int fd, char* err, int errlen) {
  const Status status = privatekeras::Mesh::Get().Attach(peer, fd);
  if (status.ok()) return 0;
  if (err != nullptr && errlen > 0) {
    std::snprintf(err, static_cast<size_t>(errlen), "%s", std::string(status.message()).c_str());
  }
  return -1;
}

// How long a receive waits for its message, and a send for its peer and its bytes (seconds;
// default 60, clamped to [0.001, 1e7]). Applies to receives and sends started afterwards.
PK_MESH_API void pk_mesh_set_timeout(double seconds) {
  privatekeras::Mesh::Get().SetTimeout(seconds);
}

// 1: worker `peer` is attached and its link healthy; 0: not attached yet; -1: its link failed
// (or `peer` is not 0, 1 or 2).
PK_MESH_API int pk_mesh_attached(int peer) { return privatekeras::Mesh::Get().Attached(peer); }

// Shuts down and closes every link, joins the reader and watchdog threads, fails waiting
// receives with Cancelled and drops undelivered messages. Peers can be attached again after.
PK_MESH_API void pk_mesh_close(void) { privatekeras::Mesh::Get().Close(); }

// Messages in the inbox plus receives waiting (for tests).
PK_MESH_API int pk_mesh_pending(void) { return privatekeras::Mesh::Get().Pending(); }
