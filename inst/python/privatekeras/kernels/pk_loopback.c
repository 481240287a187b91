/* privatekeras: confine a process's listening sockets to loopback, failing closed.
 *
 * TensorFlow's gRPC server binds its port on every interface. Preloaded (LD_PRELOAD) into a
 * worker process, this library replaces bind() so that the confined binds can only reach
 * loopback addresses.
 *
 * Which binds are confined: if the environment variable PRIVATEKERAS_CONFINE_PORTS is set
 * and non-empty, it is a comma-separated list of TCP/UDP port numbers (decimal, 1-65535, no
 * spaces, no empty items) and only binds to one of those ports are confined; every other bind
 * passes through unchanged (a worker also runs an API server that may bind a public
 * address). If it is unset or empty, every bind is confined. The variable is read once, when
 * the library is loaded; a malformed value prints a message to stderr and aborts the process.
 *
 * A confined bind, by the address family in the sockaddr:
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
 * The real bind() is looked up (dlsym RTLD_NEXT) when the library is loaded; if it cannot be
 * found the process prints a message to stderr and aborts rather than run unconfined.
 *
 * Not covered: a TCP socket that listen()s without bind() gets an ephemeral port on the
 * wildcard address; raw system calls (syscall(2), io_uring) and statically linked programs
 * bypass LD_PRELOAD. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define PK_PORTS_VAR "PRIVATEKERAS_CONFINE_PORTS"

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

static bind_fn real_bind;
static int confine_all;                     /* no port list: confine every bind */
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

static void init(void) {
  dlerror();
  real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
  if (real_bind == NULL) {
    const char *err = dlerror();
    fprintf(stderr,
            "privatekeras pk_loopback.so: cannot find the real bind() (dlsym(RTLD_NEXT, "
            "\"bind\"): %s); refusing to run unconfined\n",
            err ? err : "returned NULL");
    fflush(stderr);
    abort();
  }
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
