#' Define a cluster of three workers
#'
#' The workers hold secret shares and run the three-party protocol. With
#' `auto_managed = TRUE` (the default, as in the Syft tutorial) [pk_start()]
#' spawns them as local processes, listening on loopback only unless you name
#' other addresses. A client describes the same cluster (without starting it)
#' to [connect()].
#'
#' @param hosts Three `"host:port"` addresses.
#' @param protocol The default protocol for [share()]: `"aby3"` (default) or `"securenn"`.
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
  protocol <- match.arg(protocol, c("aby3", "securenn"))
  stopifnot(is.logical(auto_managed), length(auto_managed) == 1L, !is.na(auto_managed))
  py <- pk_call(pk_core()$Cluster(as.list(hosts), auto_managed = auto_managed,
                                  start_timeout = as.numeric(start_timeout)))
  structure(list(py = py, hosts = hosts, protocol = protocol), class = "pk_cluster")
}

#' Start or stop a cluster's workers
#'
#' `pk_start()` spawns the three auto-managed workers and waits until all
#' answer (printing progress); a port already in use is an error.
#' `pk_stop()` ends them by PID and frees their ports.
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
      if (isTRUE(py$auto_managed)) "auto-managed" else "external workers", ", ",
      if (isTRUE(py$loopback_only)) "loopback only" else "named addresses", "\n", sep = "")
  for (i in seq_along(x$hosts)) {
    state <- if (running) sprintf("running, pid %s", pids[[i]]) else
      if (isTRUE(py$auto_managed)) "stopped" else "not managed here"
    cat(sprintf("  worker%d  %-22s %s\n", i - 1L, x$hosts[[i]], state))
  }
  invisible(x)
}
