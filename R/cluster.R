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
#' @return A `pk_cluster` object: pass it to [pk_start()], [share()] or
#'   [connect()].
#' @family cluster
#' @seealso [pk_cluster_from_config()] for workers on separate hosts, described
#'   by a hosts file; `vignette("private-predictions", package = "privatekeras")`.
#' @examples
#' if (pk_available()) {
#'   # A description only: nothing starts until pk_start().
#'   cl <- pk_cluster(c("localhost:4700", "localhost:4701", "localhost:4702"))
#'   print(cl)
#'   # The client's view of the same workers (started elsewhere, by the owner):
#'   print(pk_cluster(c("localhost:4700", "localhost:4701", "localhost:4702"),
#'                    auto_managed = FALSE))
#' }
#' # Checked in R, before Python is involved:
#' try(pk_cluster(c("localhost:4700", "localhost:4701")))
#' @export
pk_cluster <- function(hosts = c("localhost:4000", "localhost:4001", "localhost:4002"),
                       protocol = "aby3", auto_managed = TRUE, start_timeout = 120) {
  hosts <- check_hosts(hosts)
  check_protocol_arg(protocol)
  if (!is.logical(auto_managed) || length(auto_managed) != 1L || is.na(auto_managed)) {
    stop("`auto_managed` must be TRUE or FALSE", call. = FALSE)
  }
  protocol <- pk_call(pk_core()$owner$check_protocol(protocol))
  py <- pk_call(pk_core()$Cluster(as.list(hosts), auto_managed = auto_managed,
                                  start_timeout = as.numeric(start_timeout)))
  structure(list(py = py, hosts = hosts, protocol = protocol), class = "pk_cluster")
}

#' Start or stop a cluster's workers
#'
#' `pk_start()` makes a throw-away certificate authority and certificates for
#' the workers, the model owner and clients (in a private per-user directory),
#' spawns the three auto-managed workers (`privatekeras worker`) and waits
#' until all answer over mutual TLS, reporting progress (silence it with
#' `options(privatekeras.verbose = FALSE)`); a port already in use is an error
#' of class `privatekeras_PortInUseError` (a `privatekeras_ClusterError`).
#' Workers of a [pk_cluster_from_config()] cluster run on their own hosts and
#' are started there, not by `pk_start()`.
#'
#' `pk_stop()` ends the workers `pk_start()` spawned, by PID, frees their ports
#' and deletes the throw-away credentials.
#'
#' @param cluster A [pk_cluster()].
#' @return The cluster, invisibly.
#' @family cluster
#' @seealso [share()], the next step of the model owner.
#' @examples
#' # Starts three real worker processes (10-20 s); needs the full environment
#' # of install_privatekeras().
#' if (pk_available("all")) {
#'   cl <- pk_cluster(c("localhost:4700", "localhost:4701", "localhost:4702"))
#'   pk_start(cl)
#'   print(cl)   # the workers' addresses and PIDs
#'   pk_stop(cl)
#' }
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

#' A cluster described by a hosts file (workers on separate hosts)
#'
#' When the workers run on hosts of their own, a hosts file (TOML) names the
#' three workers (their API addresses, links and compute ports), the model
#' owner, the clients, and the certificates of the cluster's private CA (made
#' by `privatekeras pki --config hosts.toml`). `pk_cluster_from_config()` reads
#' it as party `name` sees it: this R session then calls the workers' APIs with
#' `name`'s certificate and key, and checks each worker's certificate against
#' the file. `name` must be the owner or a client of the file; workers are
#' started on their hosts with `privatekeras worker --config hosts.toml --name
#' worker0` (see `vignette("across-machines", package = "privatekeras")`).
#'
#' The cluster is never auto-managed: [pk_start()] refuses it. Use it with
#' [share()] and [serve()] (as the owner) or [connect()] (as a client).
#'
#' @param path The hosts file.
#' @param name This party's name in the file: the owner's or a client's.
#' @inheritParams pk_cluster
#' @return A `pk_cluster` object.
#' @family cluster
#' @seealso [pk_cluster()] for workers started on this machine;
#'   `inst/examples/hosts.toml` for an annotated hosts file.
#' @examples
#' hosts_file <- system.file("examples", "hosts.toml", package = "privatekeras")
#' cat(readLines(hosts_file, n = 25), sep = "\n")
#' if (pk_available()) {
#'   # The example's certificates do not exist here, so this is the error a
#'   # party gets before `privatekeras pki --config hosts.toml` made them:
#'   try(pk_cluster_from_config(hosts_file, "owner"))
#' }
#' \dontrun{
#' cl <- pk_cluster_from_config("hosts.toml", "owner")     # on the owner's host
#' sm <- share("model.keras", cl)
#' serve(sm, num_requests = 100)
#' # on a client's host:
#' client <- connect(pk_cluster_from_config("hosts.toml", "alice"), c(1, 28, 28, 1), c(1, 10))
#' }
#' @export
pk_cluster_from_config <- function(path, name, protocol = "aby3", start_timeout = 120) {
  if (!is.character(path) || length(path) != 1L || is.na(path) || !nzchar(path)) {
    stop("`path` must be the path of a hosts file, e.g. \"hosts.toml\"", call. = FALSE)
  }
  if (!file.exists(path)) {
    stop("hosts file ", deparse1(path), " does not exist", call. = FALSE)
  }
  if (!is.character(name) || length(name) != 1L || is.na(name) || !nzchar(name)) {
    stop("`name` must be this party's name in the hosts file, e.g. \"owner\" or a client's",
         call. = FALSE)
  }
  check_protocol_arg(protocol)
  if (!is.numeric(start_timeout) || length(start_timeout) != 1L || is.na(start_timeout) ||
      start_timeout <= 0) {
    stop("`start_timeout` must be a positive number of seconds", call. = FALSE)
  }
  path <- normalizePath(path)
  protocol <- pk_call(pk_core()$owner$check_protocol(protocol))
  py <- pk_call(pk_core()$Cluster$from_config(path, name,
                                              start_timeout = as.numeric(start_timeout)))
  # Reading the credentials now makes a missing or mismatched certificate an error here.
  role <- pk_call(py$config$party(name)$role)
  pk_call(py$credentials(role))
  structure(list(py = py, hosts = unlist(py$hosts), protocol = protocol, config = path,
                 party = name, role = role),
            class = "pk_cluster")
}

check_protocol_arg <- function(protocol) {
  if (!is.character(protocol) || length(protocol) != 1L || is.na(protocol)) {
    stop("`protocol` must be a single string, e.g. \"aby3\"", call. = FALSE)
  }
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
  if (!is.null(x$config)) {
    cat("  hosts file ", x$config, ", as ", x$party, " (", x$role, ")\n", sep = "")
  }
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
