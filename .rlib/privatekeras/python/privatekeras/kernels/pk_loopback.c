/* privatekeras: confine a process's listening sockets to loopback.
 *
 * TensorFlow's gRPC server binds its port on every interface. Preloaded (LD_PRELOAD) into a
 * worker process, this turns a bind() to the IPv4 wildcard address into a bind to 127.0.0.1
 * and refuses the IPv6 wildcard (gRPC then falls back to IPv4), so the worker is reachable
 * from this machine only. Binds to explicit addresses pass through unchanged. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
  static bind_fn real_bind = NULL;
  if (real_bind == NULL) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
  if (addr != NULL && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
    struct sockaddr_in in4;
    memcpy(&in4, addr, sizeof(in4));
    if (in4.sin_addr.s_addr == htonl(INADDR_ANY)) {
      in4.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      return real_bind(fd, (const struct sockaddr *)&in4, sizeof(in4));
    }
  }
  if (addr != NULL && addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)addr;
    if (memcmp(&in6->sin6_addr, &in6addr_any, sizeof(struct in6_addr)) == 0) {
      errno = EADDRNOTAVAIL;
      return -1;
    }
  }
  return real_bind(fd, addr, len);
}
