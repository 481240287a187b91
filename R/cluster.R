#' Define a cluster of three workers
#'
#' The three workers hold secret shares and are the only processes that
#' compute. Each one is a server: owners and clients reach it only through its
#' API (gRPC with mutual TLS), at the `"host:port"` addresses given here. The
#' workers' own TensorFlow servers listen on loopback only (across hosts their
#' traffic goes through TLS links); owners and clients never talk to them.
#'
#' With `auto_managed = TRUE` (the default, as in the Syft tutorial)
#' [pk_start()] spawns the workers as local processes, with a throw-away
#' certificate authority for them in a private per-user directory. A model
#' owner or a client run by the same user on the same machine describes the
#' same cluster (with `auto_managed = FALSE`) and finds those credentials
#' without configuration; see [connect()].
#'
#' @param hosts Three `"host:port"` addresses: where the workers' APIs listen.
#' @param protocol The protocol for [share()]: `"aby3"`, the only one offered.
#'   `"securenn"` (withdrawn: it leaks to worker 2) and `"pond"` are refused
#'   with the Python core's error, which says why.
#' @param auto_managed Whether [pk_start()] spawns the workers here.
#' @param start_timeout Seconds to wait for the workers to answer.
#' @return A `pk_cluster` object.
#' @examples
#' \dontrun{
#' cl <- pk_cluster(c("localhost:4000", "localhost:4001", "localhost:4002"))
#' pk_start(cl)
#' cl
#' pk_stop(cl)
#' }
#' @export
pk_cluster <- function(hosts = c("localhost:4000", "localhost:4001", "localhost:4002"),
                       protocol = "aby3", auto_managed = TRUE, start_timeout = 120) {
  hosts <- check_hosts(hosts)
  if (!is.character(protocol) || length(protocol) != 1L || is.na(protocol)) {
    stop("`protocol` must be a single string, e.g. \"aby3\"", call. = FALSE)
  }
  stopifnot(is.logical(auto_managed), length(auto_managed) == 1L, !is.na(auto_managed))
  protocol <- pk_call(pk_core()$owner$check_protocol(protocol))
  py <- pk_call(pk_core()$Cluster(as.list(hosts), auto_managed = auto_managed,
                                  start_timeout = as.numeric(start_timeout)))
  structure(list(py = py, hosts = hosts, protocol = protocol), class = "pk_cluster")
}

#' Start or stop a cluster's workers
#'
#' `pk_start()` makes a throw-away certificate authority and certificates for
#' the workers, the model owner and clients (in a private per-user directory),
#' spawns the three auto-managed workers (`python -m privatekeras worker`) and
#' waits until all answer over mutual TLS, printing progress; a port already in
#' use is an error. `pk_stop()` ends them by PID, frees their ports and deletes
#' the credentials.
#'
#' @param cluster A [pk_cluster()].
#' @return The cluster, invisibly.
#' @export
pk_start <- function(cluster) {
  check_cluster(cluster)
  pk_call(cluster$py$start())
  invisible(cluster)
}

#' @rdname pk_start
#' @export
pk_stop <- function(cluster) {
  check_cluster(cluster)
  pk_call(cluster$py$stop())
  invisible(cluster)
}

check_cluster <- function(cluster) {
  if (!inherits(cluster, "pk_cluster")) {
    stop("`cluster` must be made by pk_cluster(); got an object of class ",
         paste(class(cluster), collapse = "/"), call. = FALSE)
  }
}

#' @export
print.pk_cluster <- function(x, ...) {
  py <- x$py
  running <- isTRUE(py$running)
  pids <- unlist(py$pids)
  cat("<privatekeras cluster> protocol ", x$protocol, ", ",
      if (isTRUE(py$auto_managed)) "auto-managed" else "external workers", "\n", sep = "")
  cat("  APIs (mutual TLS) on ",
      if (isTRUE(py$loopback_only)) "loopback only" else "the named addresses",
      "; workers' TensorFlow ports on loopback only\n", sep = "")
  for (i in seq_along(x$hosts)) {
    state <- if (running) sprintf("running, pid %s", pids[[i]]) else
      if (isTRUE(py$auto_managed)) "stopped" else "not managed here"
    cat(sprintf("  worker%d  %-22s %s\n", i - 1L, x$hosts[[i]], state))
  }
  invisible(x)
}
