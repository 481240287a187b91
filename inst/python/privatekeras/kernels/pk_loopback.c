/* privatekeras: confine a process's listening sockets to loopback and to its own user, failing
 * closed.
 *
 * TensorFlow's gRPC server binds its port on every interface and runs any graph sent to it,
 * with no authentication. Preloaded (LD_PRELOAD) into a worker process, this library replaces
 * bind() so that the confined binds can only reach loopback addresses, and accept()/accept4()
 * so that a connection to a confined port is kept only when the connecting socket belongs to
 * the worker's own user.
 *
 * Which ports are confined: if the environment variable PRIVATEKERAS_CONFINE_PORTS is set and
 * non-empty, it is a comma-separated list of TCP/UDP port numbers (decimal, 1-65535, no
 * spaces, no empty items) and only those ports are confined; binds to other ports, and
 * connections accepted on other ports, pass through unchanged (a worker also runs an API
 * server that may bind a public address and authenticates its own clients). If it is unset or
 * empty, every port is confined. The variable is read once, when the library is loaded; a
 * malformed value prints a message to stderr and aborts the process.
 *
 * BIND. A confined bind, by the address family in the sockaddr:
 *   AF_INET   0.0.0.0 (wildcard)              -> bound to 127.0.0.1 instead (same port)
 *             127.0.0.0/8 (loopback)          -> unchanged
 *             any other address               -> fails with EADDRNOTAVAIL
 *   AF_INET6  ::1, ::ffff:127.0.0.0/104       -> unchanged
 *             :: (wildcard; gRPC then falls back to IPv4), ::ffff:0.0.0.0, any other
 *                                             -> fails with EADDRNOTAVAIL
 *   AF_UNSPEC                                 -> fails with EAFNOSUPPORT (Linux binds an
 *                                                AF_INET socket to the IPv4 wildcard when
 *                                                given AF_UNSPEC with address 0.0.0.0)
 *   other families (AF_UNIX, AF_NETLINK, ...) -> unchanged
 * A NULL address, or one too short to hold its family, fails with EINVAL (as the kernel would
 * fail it). Under PRIVATEKERAS_CONFINE_PORTS the port is read from the sockaddr before
 * anything else; an AF_INET, AF_INET6 or AF_UNSPEC address too short to hold a port counts
 * as confined, and a confined AF_INET/AF_INET6 address shorter than its sockaddr fails with
 * EINVAL.
 *
 * ACCEPT. Loopback alone still lets every local process of every user of the machine connect
 * to the TensorFlow server and run graphs that read the worker's shares. So accept() and
 * accept4() (TensorFlow 2.20's gRPC calls accept4 with SOCK_NONBLOCK|SOCK_CLOEXEC on a
 * non-blocking listener, until EAGAIN) check each connection they return:
 *   1. Which connections: the accepted socket's local address (getsockname) decides. AF_INET
 *      and AF_INET6 sockets whose local port is confined (the rule above) are checked; any
 *      other socket (AF_UNIX, a port not in the list) is returned unchanged.
 *   2. Whose socket connected: a confined port listens on loopback only, so the connecting
 *      socket is on this host, in this network namespace, and the kernel lists it in
 *      /proc/thread-self/net/tcp (IPv4 sockets) or /proc/thread-self/net/tcp6 (IPv6 sockets,
 *      including IPv4-mapped ones; /proc/self/net/ on kernels without thread-self) with its
 *      local address:port equal to the accepted socket's peer (getpeername) and its remote
 *      address:port equal to the accepted socket's local address. An IPv4 address equals its
 *      IPv4-mapped IPv6 form (a dual-stack listener accepts IPv4 clients; an IPv6 client may
 *      connect to ::ffff:127.0.0.1): for an IPv4 peer tcp is read, then tcp6 if no entry
 *      matched; for any other peer only tcp6. A table is read to its end. Addresses there
 *      are hexadecimal 32-bit words in host byte order, ports hexadecimal numbers (as
 *      privatekeras/deploy/listening.py decodes them); a line that does not have exactly that
 *      shape is skipped. Entries whose inode column is 0 are ignored: those are time-wait
 *      sockets (shown with uid 0 whatever their owner) and sockets whose file is already
 *      closed, which no longer belong to anyone.
 *   3. The rule: the connection is admitted when at least one entry matches and the uid
 *      column of every matching entry equals this process's effective uid (geteuid() at accept
 *      time). The uids must be equal: root connecting to a worker that runs as another user is
 *      refused too. Everything else is refused, failing closed: another uid; no matching
 *      entry (the client closed before the check, a peer outside this network namespace, a
 *      /proc/self/net/tcp that cannot be read); getsockname() or getpeername() failing.
 *   4. A refused connection is closed at once (the client reads end of stream or a reset,
 *      never a byte from the server) and the call goes on accepting, as if that connection had
 *      never arrived: a blocking listener waits for the next one; a non-blocking one returns
 *      the next queued connection or fails with EAGAIN when none is left. It never fails with
 *      ECONNABORTED: gRPC answers ECONNABORTED by waiting for the next edge-triggered
 *      readiness event of the listener, so connections already queued behind the refused one
 *      would wait until yet another connection arrives (seen with TensorFlow 2.20), and
 *      Python's selector-based servers do not catch it. Before each retry the caller's
 *      address length is reset to the value it passed. Errors of the real accept (EAGAIN,
 *      EINTR, EMFILE, ...) are returned unchanged.
 *   5. The first 10 refusals print one line each on stderr, naming the port, the peer's
 *      address and the uid that owns it (or why it is unknown); later ones print nothing.
 *   This path allocates nothing and uses no stdio: /proc is read with open/read/close into a
 *   fixed buffer and the message is written with write(2), so it is safe on gRPC's threads.
 *   It costs one or two reads of those tables per accepted connection on a confined port
 *   (nothing on other ports beyond one getsockname()): the kernel walks its whole TCP hash
 *   table to print them, a few milliseconds per table on a machine with 262144 hash buckets,
 *   which suits TensorFlow's few long-lived connections.
 *
 * What the uid rule protects: the worker's shares against the machine's other users. What it
 * does not: the worker's own user. Processes of that user are admitted; they could read the
 * worker's memory (ptrace, /proc/<pid>/mem) anyway. The uid in /proc is the socket's owner:
 * the (fs) uid of the process that created it, which only fchown() with CAP_CHOWN changes.
 * Consequences: whatever must reach a compute port (the other workers of a cluster on one
 * machine, the stunnel links of a multi-host cluster, a port forwarder in front of
 * --compute-port) must run as the worker's user. A worker running as root admits every socket
 * created by root, including those of set-uid-root programs that any user may run: run
 * workers as an unprivileged user. Do not run a worker as the overflow uid (nobody, 65534):
 * /proc shows the sockets of users unmapped in this user namespace with that uid.
 *
 * The real bind(), accept() and accept4() are looked up (dlsym RTLD_NEXT) when the library is
 * loaded; if one cannot be found the process prints a message to stderr and aborts rather than
 * run unconfined.
 *
 * Not covered: a TCP socket that listen()s without bind() gets an ephemeral port on the
 * wildcard address (its connections are still checked when every port is confined); raw
 * system calls (syscall(2), io_uring) and statically linked programs bypass LD_PRELOAD. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#define PK_PORTS_VAR "PRIVATEKERAS_CONFINE_PORTS"

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);
typedef int (*accept_fn)(int, struct sockaddr *, socklen_t *);
typedef int (*accept4_fn)(int, struct sockaddr *, socklen_t *, int);

static bind_fn real_bind;
static accept_fn real_accept;
static accept4_fn real_accept4;
static int confine_all;                     /* no port list: every port is confined */
static unsigned char confined_port[65536];  /* with a port list: 1 for a listed port */
static pthread_once_t init_once = PTHREAD_ONCE_INIT;


/* Parses PRIVATEKERAS_CONFINE_PORTS into confined_port; aborts on a malformed value. */
static void parse_ports(const char *spec) {
  const char *p = spec;
  for (;;) {
    long port = 0;
    int digits = 0;
    while (*p >= '0' && *p <= '9') {
      port = port * 10 + (*p - '0');
      if (port > 65535) break;
      ++p;
      ++digits;
    }
    if (digits == 0 || port < 1 || port > 65535 || (*p != ',' && *p != '\0')) {
      fprintf(stderr,
              "privatekeras pk_loopback.so: malformed " PK_PORTS_VAR "=\"%s\" (expected "
              "comma-separated port numbers in 1-65535, e.g. \"4000,4001\"); refusing to "
              "run unconfined\n",
              spec);
      fflush(stderr);
      abort();
    }
    confined_port[port] = 1;
    if (*p == '\0') return;
    ++p; /* the comma; an item must follow it */
  }
}

/* The next definition of `name` after this library (libc's); aborts when there is none. */
static void *real_function(const char *name) {
  dlerror();
  void *fn = dlsym(RTLD_NEXT, name);
  if (fn == NULL) {
    const char *err = dlerror();
    fprintf(stderr,
            "privatekeras pk_loopback.so: cannot find the real %s() (dlsym(RTLD_NEXT, "
            "\"%s\"): %s); refusing to run unconfined\n",
            name, name, err ? err : "returned NULL");
    fflush(stderr);
    abort();
  }
  return fn;
}

static void init(void) {
  real_bind = (bind_fn)real_function("bind");
  real_accept = (accept_fn)real_function("accept");
  real_accept4 = (accept4_fn)real_function("accept4");
  const char *spec = getenv(PK_PORTS_VAR);
  if (spec == NULL || spec[0] == '\0') {
    confine_all = 1;
  } else {
    parse_ports(spec);
  }
}

__attribute__((constructor)) static void pk_loopback_load(void) { pthread_once(&init_once, init); }

/* Whether a bind to this address is confined; reads the port when a port list is set. */
static int is_confined(const struct sockaddr *addr, socklen_t len) {
  if (confine_all) return 1;
  /* sin_port and sin6_port sit at the same offset, right after the family. */
  const size_t port_end = offsetof(struct sockaddr_in, sin_port) + sizeof(in_port_t);
  if (addr == NULL || (size_t)len < port_end) return 1;
  in_port_t port_be;
  memcpy(&port_be, (const char *)addr + offsetof(struct sockaddr_in, sin_port), sizeof(port_be));
  return confined_port[ntohs(port_be)];
}

static int fail(int err) {
  errno = err;
  return -1;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
  pthread_once(&init_once, init); /* in case bind() runs before our constructor */

  if (addr == NULL || (size_t)len < sizeof(sa_family_t)) return fail(EINVAL);
  sa_family_t family;
  memcpy(&family, addr, sizeof(family));
  if (family != AF_INET && family != AF_INET6 && family != AF_UNSPEC) {
    return real_bind(fd, addr, len);
  }
  if (!is_confined(addr, len)) return real_bind(fd, addr, len);

  if (family == AF_UNSPEC) return fail(EAFNOSUPPORT);

  if (family == AF_INET) {
    struct sockaddr_in in4;
    if ((size_t)len < sizeof(in4)) return fail(EINVAL);
    memcpy(&in4, addr, sizeof(in4));
    const uint32_t host = ntohl(in4.sin_addr.s_addr);
    if (host == INADDR_ANY) {
      in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      return real_bind(fd, (const struct sockaddr *)&in4, sizeof(in4));
    }
    if ((host >> 24) == 127) return real_bind(fd, addr, len);
    return fail(EADDRNOTAVAIL);
  }

  /* AF_INET6 */
  struct sockaddr_in6 in6;
  if ((size_t)len < sizeof(in6)) return fail(EINVAL);
  memcpy(&in6, addr, sizeof(in6));
  const unsigned char *a = in6.sin6_addr.s6_addr;
  static const unsigned char mapped_prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  if (memcmp(&in6.sin6_addr, &in6addr_loopback, sizeof(in6.sin6_addr)) == 0) {
    return real_bind(fd, addr, len);
  }
  if (memcmp(a, mapped_prefix, sizeof(mapped_prefix)) == 0 && a[12] == 127) {
    return real_bind(fd, addr, len);
  }
  return fail(EADDRNOTAVAIL);
}


/* ---------------------------------------------------------------------------------------------
 * accept() and accept4(): keep a connection to a confined port only when the connecting socket
 * belongs to this process's effective uid (see ACCEPT in the header). */

#define PK_LOGGED_REFUSALS 10
#define PK_TCP_LISTEN 0x0A  /* the "st" column of a listening socket */

static unsigned int refusals; /* connections refused so far (atomic) */

/* An address and port in the form they are compared in: IPv4 as IPv4-mapped IPv6. */
struct endpoint {
  unsigned char addr[16];
  unsigned int port;
};

static const unsigned char mapped_v4_prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

/* What the scan of /proc/self/net/tcp{,6} looks for and what it found. */
struct lookup {
  struct endpoint self; /* the accepted socket's local address (the listener's) */
  struct endpoint peer; /* the accepted socket's peer: the connecting socket's local address */
  int matches;          /* entries whose local address is `peer` and remote address `self` */
  int mixed;            /* 1 when two matching entries disagree about the uid */
  unsigned long uid;    /* the uid column of the first matching entry */
};

/* `e` from an AF_INET or AF_INET6 address (as getsockname/getpeername return them). */
static int endpoint_from(const struct sockaddr_storage *ss, socklen_t len, struct endpoint *e) {
  if (ss->ss_family == AF_INET && (size_t)len >= sizeof(struct sockaddr_in)) {
    struct sockaddr_in in4;
    memcpy(&in4, ss, sizeof(in4));
    memcpy(e->addr, mapped_v4_prefix, sizeof(mapped_v4_prefix));
    memcpy(e->addr + 12, &in4.sin_addr, 4);
    e->port = ntohs(in4.sin_port);
    return 0;
  }
  if (ss->ss_family == AF_INET6 && (size_t)len >= sizeof(struct sockaddr_in6)) {
    struct sockaddr_in6 in6;
    memcpy(&in6, ss, sizeof(in6));
    memcpy(e->addr, &in6.sin6_addr, 16);
    e->port = ntohs(in6.sin6_port);
    return 0;
  }
  return -1;
}

static int endpoint_equal(const struct endpoint *a, const struct endpoint *b) {
  return a->port == b->port && memcmp(a->addr, b->addr, sizeof(a->addr)) == 0;
}

/* -- Parsing one line of /proc/net/tcp or /proc/net/tcp6 -------------------------------------
 * The kernel prints (net/ipv4/tcp_ipv4.c, net/ipv6/tcp_ipv6.c), after a header line:
 *   "%4d: %08X:%04X %08X:%04X %02X %08X:%08X %02X:%08lX %08X %5u %8d %lu ..."
 *    sl   local      remote     st tx:rx     tr:when     retr  uid timeout inode
 * where tcp6 prints each address as four %08X words. Each word is 32 bits of the address as
 * the kernel stores it (network byte order) read as a host-order integer, so storing the
 * parsed integer back in host order gives the address bytes; the port is a plain number. */

static int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

/* Exactly `digits` (at most 8) hexadecimal digits at *p. */
static int parse_hex(const char **p, int digits, uint32_t *out) {
  uint32_t value = 0;
  for (int i = 0; i < digits; ++i) {
    const int d = hex_digit((*p)[i]);
    if (d < 0) return -1;
    value = (value << 4) | (uint32_t)d;
  }
  *p += digits;
  *out = value;
  return 0;
}

/* A decimal number at *p, at most `max`, followed by a blank or the end of the line. */
static int parse_decimal(const char **p, unsigned long max, unsigned long *out) {
  unsigned long value = 0;
  int digits = 0;
  while (**p >= '0' && **p <= '9') {
    const unsigned long d = (unsigned long)(**p - '0');
    if (value > (max - d) / 10) return -1;
    value = value * 10 + d;
    ++*p;
    ++digits;
  }
  if (digits == 0 || (**p != ' ' && **p != '\0')) return -1;
  *out = value;
  return 0;
}

/* "address:port" with `words` 32-bit words (1: IPv4, 4: IPv6), followed by a blank. */
static int parse_endpoint(const char **p, int words, struct endpoint *e) {
  unsigned char raw[16];
  for (int i = 0; i < words; ++i) {
    uint32_t word;
    if (parse_hex(p, 8, &word) != 0) return -1;
    memcpy(raw + 4 * i, &word, 4); /* host order, as the kernel printed it */
  }
  uint32_t port;
  if (**p != ':') return -1;
  ++*p;
  if (parse_hex(p, 4, &port) != 0 || **p != ' ') return -1;
  if (words == 1) {
    memcpy(e->addr, mapped_v4_prefix, sizeof(mapped_v4_prefix));
    memcpy(e->addr + 12, raw, 4);
  } else {
    memcpy(e->addr, raw, 16);
  }
  e->port = port;
  return 0;
}

static const char *skip_blanks(const char *p) {
  while (*p == ' ') ++p;
  return p;
}

/* Skips one field and the blanks after it; NULL when there is no field. */
static const char *skip_field(const char *p) {
  const char *q = p;
  while (*q != ' ' && *q != '\0') ++q;
  return q == p ? NULL : skip_blanks(q);
}

/* Records the line in `l` if it is a well-formed entry of the connecting socket. */
static void consider_line(const char *line, int words, struct lookup *l) {
  struct endpoint local, remote;
  uint32_t state;
  unsigned long uid, inode;
  const char *p = skip_blanks(line);
  const char *q = p;
  while (*q >= '0' && *q <= '9') ++q; /* "sl:"; the header line starts with "sl" */
  if (q == p || *q != ':') return;
  p = skip_blanks(q + 1);
  if (parse_endpoint(&p, words, &local) != 0) return;
  p = skip_blanks(p);
  if (parse_endpoint(&p, words, &remote) != 0) return;
  p = skip_blanks(p);
  if (parse_hex(&p, 2, &state) != 0 || *p != ' ') return;
  p = skip_blanks(p);
  for (int i = 0; i < 3 && p != NULL; ++i) p = skip_field(p); /* tx:rx, tr:when, retrnsmt */
  if (p == NULL || parse_decimal(&p, 0xFFFFFFFFUL, &uid) != 0) return;
  p = skip_blanks(p);
  p = skip_field(p); /* timeout */
  if (p == NULL || parse_decimal(&p, (unsigned long)-1, &inode) != 0) return;

  if (inode == 0 || state == PK_TCP_LISTEN) return; /* time-wait, closed, or a listener */
  if (!endpoint_equal(&local, &l->peer) || !endpoint_equal(&remote, &l->self)) return;
  if (l->matches == 0) {
    l->uid = uid;
  } else if (l->uid != uid) {
    l->mixed = 1;
  }
  ++l->matches;
}

/* Opens /proc/thread-self/net/<table> (the calling thread's network namespace), or
 * /proc/self/net/<table> on kernels without thread-self. */
static int open_table(const char *thread_path, const char *self_path) {
  int fd;
  do {
    fd = open(thread_path, O_RDONLY | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd >= 0 || errno != ENOENT) return fd;
  do {
    fd = open(self_path, O_RDONLY | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  return fd;
}

/* Feeds every line of one table to consider_line, reading in fixed chunks (no allocation).
 * Returns 0, or -1 when the table cannot be read; a missing table counts as empty when
 * `missing_ok` (no IPv6 in this kernel). A line longer than the line buffer is skipped. */
static int scan_table(const char *thread_path, const char *self_path, int words, int missing_ok,
                      struct lookup *l) {
  char chunk[16384];
  char line[512]; /* a tcp6 line is about 150 characters */
  size_t len = 0;
  int too_long = 0;
  const int fd = open_table(thread_path, self_path);
  if (fd < 0) return (missing_ok && errno == ENOENT) ? 0 : -1;
  for (;;) {
    const ssize_t n = read(fd, chunk, sizeof(chunk));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      close(fd);
      return -1;
    }
    if (n == 0) break;
    for (ssize_t i = 0; i < n; ++i) {
      if (chunk[i] == '\n') {
        line[len] = '\0';
        if (!too_long) consider_line(line, words, l);
        len = 0;
        too_long = 0;
      } else if (len + 1 < sizeof(line)) {
        line[len++] = chunk[i];
      } else {
        too_long = 1;
      }
    }
  }
  close(fd);
  line[len] = '\0';
  if (len > 0 && !too_long) consider_line(line, words, l);
  return 0;
}

/* -- The refusal message: built in a fixed buffer, written with write(2) -------------------- */

struct message {
  char text[384];
  size_t len;
};

static void add_text(struct message *m, const char *s) {
  while (*s != '\0' && m->len + 1 < sizeof(m->text)) m->text[m->len++] = *s++;
}

static void add_number(struct message *m, unsigned long value) {
  char digits[24];
  int n = 0;
  do {
    digits[n++] = (char)('0' + value % 10);
    value /= 10;
  } while (value != 0);
  while (n > 0 && m->len + 1 < sizeof(m->text)) m->text[m->len++] = digits[--n];
}

static void add_endpoint(struct message *m, const struct endpoint *e) {
  char address[INET6_ADDRSTRLEN];
  if (memcmp(e->addr, mapped_v4_prefix, sizeof(mapped_v4_prefix)) == 0) {
    add_text(m, inet_ntop(AF_INET, e->addr + 12, address, sizeof(address)) ? address : "?");
  } else {
    add_text(m, "[");
    add_text(m, inet_ntop(AF_INET6, e->addr, address, sizeof(address)) ? address : "?");
    add_text(m, "]");
  }
  add_text(m, ":");
  add_number(m, e->port);
}

enum refusal { NO_LOCAL_ADDRESS, NO_PEER_ADDRESS, PROC_UNREADABLE, NOT_FOUND, MIXED, OTHER_UID };

/* Counts a refusal and, for the first PK_LOGGED_REFUSALS, writes one line to stderr. */
static void report_refusal(enum refusal why, const struct lookup *l) {
  const unsigned int n = __atomic_add_fetch(&refusals, 1, __ATOMIC_RELAXED);
  if (n > PK_LOGGED_REFUSALS) return;
  struct message m;
  m.len = 0;
  add_text(&m, "privatekeras pk_loopback.so: refused a connection");
  if (why != NO_LOCAL_ADDRESS) {
    add_text(&m, " to port ");
    add_number(&m, l->self.port);
  }
  if (why != NO_LOCAL_ADDRESS && why != NO_PEER_ADDRESS) {
    add_text(&m, " from ");
    add_endpoint(&m, &l->peer);
  }
  switch (why) {
    case NO_LOCAL_ADDRESS:
      add_text(&m, ": getsockname() failed on the accepted socket (owner unknown)");
      break;
    case NO_PEER_ADDRESS:
      add_text(&m, ": getpeername() failed on the accepted socket (owner unknown)");
      break;
    case PROC_UNREADABLE:
      add_text(&m, ": cannot read /proc/self/net/tcp or tcp6 (uid unknown)");
      break;
    case NOT_FOUND:
      add_text(&m, ": no open socket with that address in /proc/self/net/tcp or tcp6 "
                   "(uid unknown)");
      break;
    case MIXED:
      add_text(&m, ": sockets of several uids match it in /proc/self/net/tcp{,6}");
      break;
    case OTHER_UID:
      add_text(&m, ": uid ");
      add_number(&m, l->uid);
      add_text(&m, ", not this process's uid ");
      add_number(&m, (unsigned long)geteuid());
      break;
  }
  if (n == PK_LOGGED_REFUSALS) add_text(&m, " (further refusals are not logged)");
  add_text(&m, "\n");
  size_t done = 0;
  while (done < m.len) {
    const ssize_t w = write(STDERR_FILENO, m.text + done, m.len - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) break;
    done += (size_t)w;
  }
}

/* Whether to keep connection `fd` from the real accept; reports the ones it refuses. */
static int admit(int fd) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof(ss);
  struct lookup l;
  memset(&l, 0, sizeof(l));
  if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0) {
    report_refusal(NO_LOCAL_ADDRESS, &l);
    return 0;
  }
  if (ss.ss_family != AF_INET && ss.ss_family != AF_INET6) return 1;
  if (endpoint_from(&ss, len, &l.self) != 0) {
    report_refusal(NO_LOCAL_ADDRESS, &l);
    return 0;
  }
  if (!confine_all && !confined_port[l.self.port]) return 1;
  len = sizeof(ss);
  if (getpeername(fd, (struct sockaddr *)&ss, &len) != 0 || endpoint_from(&ss, len, &l.peer) != 0) {
    report_refusal(NO_PEER_ADDRESS, &l);
    return 0;
  }
  /* An IPv4 (or IPv4-mapped) peer is an IPv4 socket, listed in tcp, or an IPv6 one connected
   * to an IPv4-mapped address, listed in tcp6; any other IPv6 peer is in tcp6. The kernel
   * keeps one connected socket per address pair, so tcp6 is not read once tcp had it. */
  int unreadable = 0;
  if (memcmp(l.peer.addr, mapped_v4_prefix, sizeof(mapped_v4_prefix)) == 0) {
    unreadable = scan_table("/proc/thread-self/net/tcp", "/proc/self/net/tcp", 1, 0, &l);
  }
  if (!unreadable && l.matches == 0) {
    unreadable = scan_table("/proc/thread-self/net/tcp6", "/proc/self/net/tcp6", 4, 1, &l);
  }
  if (unreadable) {
    report_refusal(PROC_UNREADABLE, &l);
    return 0;
  }
  if (l.matches == 0) {
    report_refusal(NOT_FOUND, &l);
    return 0;
  }
  if (l.mixed) {
    report_refusal(MIXED, &l);
    return 0;
  }
  if (l.uid != (unsigned long)geteuid()) {
    report_refusal(OTHER_UID, &l);
    return 0;
  }
  return 1;
}

/* The real accept (with_flags == 0) or accept4, repeated until it fails or returns a
 * connection that admit() keeps; refused connections are closed. */
static int accept_admitted(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags,
                           int with_flags) {
  pthread_once(&init_once, init);
  const int has_len = addr != NULL && addrlen != NULL;
  const socklen_t len_in = has_len ? *addrlen : 0;
  for (;;) {
    const int conn = with_flags ? real_accept4(fd, addr, addrlen, flags)
                                : real_accept(fd, addr, addrlen);
    if (conn < 0) return conn;
    const int saved_errno = errno;
    if (admit(conn)) {
      errno = saved_errno;
      return conn;
    }
    close(conn);
    errno = saved_errno;
    if (has_len) *addrlen = len_in;
  }
}

int accept(int fd, struct sockaddr *addr, socklen_t *addrlen) {
  return accept_admitted(fd, addr, addrlen, 0, 0);
}

int accept4(int fd, struct sockaddr *addr, socklen_t *addrlen, int flags) {
  return accept_admitted(fd, addr, addrlen, flags, 1);
}
