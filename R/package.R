#' privatekeras: private predictions from Keras models
#'
#' A model owner secret-shares a trained Keras model's weights among three
#' workers, which run the ABY3 three-party computation protocol and answer
#' private queries; a client secret-shares its input locally and alone
#' reconstructs the answer. Only the three workers compute: the owner and the
#' clients reach them through a small authenticated API (gRPC with mutual
#' TLS), and a client needs no TensorFlow.
#'
#' The verbs mirror the Python core one to one:
#' * the cluster: [pk_cluster()], [pk_cluster_from_config()], [pk_start()],
#'   [pk_stop()];
#' * the model owner: [share()], [serve()], [stop_serving()];
#' * a client: [connect()], [query()], [disconnect()];
#' * set-up: [install_privatekeras()] (once; `role = "client"` for a
#'   client-only environment), [pk_available()], [pk_python()],
#'   [pk_fashion_mnist()].
#'
#' Errors from the Python core are R errors with the same message and one
#' class per class of the Python exception's hierarchy, e.g.
#' `privatekeras_PortInUseError`, `privatekeras_ClusterError`,
#' `privatekeras_PrivateKerasError`. Progress messages of the Python core are
#' silenced with `options(privatekeras.verbose = FALSE)` (`"quiet"` also hides
#' warnings).
#'
#' Start with `vignette("private-predictions", package = "privatekeras")`;
#' "How it works" explains the secret sharing and the threat model, and
#' "Across machines" runs the parties on separate hosts.
#'
#' @keywords internal
"_PACKAGE"

# The Python core, imported lazily from inst/python on first use.
pk_env <- new.env(parent = emptyenv())

.onLoad <- function(libname, pkgname) {
  Sys.setenv(TF_CPP_MIN_LOG_LEVEL = Sys.getenv("TF_CPP_MIN_LOG_LEVEL", "2"))
  # R starts processes by fork() + exec() (processx, callr) and never uses gRPC in a forked
  # child. With gRPC's fork support on, its fork handlers restart the poller thread in the
  # child, which aborts (SIGABRT, "epoll_wait error: Bad file descriptor") when the child
  # closes its descriptors before exec: the child dies before it runs. Off unless set.
  if (!nzchar(Sys.getenv("GRPC_ENABLE_FORK_SUPPORT"))) {
    Sys.setenv(GRPC_ENABLE_FORK_SUPPORT = "false")
  }
  configure_python()
  pk_env$module <- reticulate::import_from_path(
    "privatekeras",
    path = system.file("python", package = pkgname),
    delay_load = list(on_error = function(e) stop(missing_env_message(e), call. = FALSE))
  )
}

# RETICULATE_PYTHON wins; otherwise the "r-privatekeras" virtualenv, when it exists.
configure_python <- function(envname = "r-privatekeras") {
  if (nzchar(Sys.getenv("RETICULATE_PYTHON"))) return(invisible(FALSE))
  if (reticulate::virtualenv_exists(envname)) {
    reticulate::use_virtualenv(envname, required = FALSE)
    return(invisible(TRUE))
  }
  invisible(FALSE)
}

missing_env_message <- function(e) {
  paste0(
    "privatekeras' Python environment is missing or incomplete. Run ",
    "`privatekeras::install_privatekeras()` once (or set RETICULATE_PYTHON to a Python ",
    "with the privatekeras stack). Python said: ", conditionMessage(e)
  )
}

# The Python core module (imported on first use).
pk_core <- function() {
  mod <- pk_env$module
  ok <- tryCatch({
    reticulate::py_get_attr(mod, "__version__")
    TRUE
  }, error = function(e) e)
  if (!isTRUE(ok)) stop(missing_env_message(ok), call. = FALSE)
  mod
}

#' The privatekeras Python module
#'
#' Gives direct access to the Python core, for example to use the
#' Syft-compatible facade (`KerasHook`, `TFEWorker`, `TFECluster`) exactly as
#' the 2020 tutorial did with `sy <- import("syft")`.
#'
#' @return The `privatekeras` Python module (a reticulate object).
#' @family setup
#' @seealso `vignette("from-syft", package = "privatekeras")`.
#' @examples
#' if (pk_available()) {
#'   sy <- pk_python()
#'   print(sy$`__version__`)
#'   # The Syft tutorial's names:
#'   print(c("KerasHook", "TFEWorker", "TFECluster") %in% names(sy))
#' }
#' @export
pk_python <- function() pk_core()

#' Is privatekeras' Python side installed?
#'
#' `pk_available()` tells whether this R session finds a Python with the
#' privatekeras core and what a client needs (numpy, grpcio, protobuf): enough
#' to [connect()] and [query()]. `pk_available("all")` also asks for what the
#' model owner and workers started here need: TensorFlow and the compiled
#' secure kernels (see [install_privatekeras()]). Neither starts a worker or
#' imports TensorFlow.
#'
#' @param role `"client"` or `"all"`.
#' @return `TRUE` or `FALSE`.
#' @family setup
#' @seealso [install_privatekeras()] to install what is missing.
#' @examples
#' pk_available()
#' pk_available("all")
#' @export
pk_available <- function(role = c("client", "all")) {
  role <- match.arg(role)
  ok <- tryCatch({
    pk_core()
    TRUE
  }, error = function(e) FALSE)
  if (!ok || role == "client") return(ok)
  isTRUE(tryCatch({
    util <- reticulate::import("importlib.util")
    !is.null(util$find_spec("tensorflow")) &&
      !is.null(reticulate::import("privatekeras.kernels")$find_library())
  }, error = function(e) FALSE))
}

# Run a call into Python. A Python exception becomes an R error with the same message, the
# user's call (the privatekeras function the user called, not an internal frame), and one
# class per class of the exception's hierarchy: a PortInUseError is caught as
# privatekeras_PortInUseError, privatekeras_ClusterError or privatekeras_PrivateKerasError.
pk_call <- function(expr) {
  call <- user_call()
  sync_verbosity()
  tryCatch(expr, error = function(e) {
    if (!inherits(e, "Rcpp::exception") && !inherits(e, "python.builtin.object")) stop(e)
    stop(python_condition(e, call))
  })
}

# The outermost call into this package on the stack (pk_call() itself left out): the call the
# user typed, e.g. `pk_start(cl)`, even when the verb reached Python through helpers. NULL
# when no privatekeras function is on the stack.
user_call <- function() {
  ns <- topenv(environment(user_call))
  for (i in seq_len(sys.nframe() - 1L)) {  # not this function's own frame
    fn <- sys.function(i)
    env <- if (is.function(fn)) environment(fn)
    if (!is.null(env) && identical(topenv(env), ns) && !identical(fn, pk_call)) {
      return(sys.call(i))
    }
  }
  NULL
}

# An R error condition for a Python exception raised through reticulate.
python_condition <- function(e, call) {
  msg <- sub("\n+$", "", conditionMessage(e))
  first <- sub("\n.*", "", msg)
  type <- sub("^([A-Za-z_][A-Za-z0-9_.]*):.*$", "\\1", first)
  if (identical(type, first)) return(e)  # not "Type: message": not a Python exception
  body <- sub("^[A-Za-z_][A-Za-z0-9_.]*: ?", "", msg)
  chain <- sub(".*\\.", "", type)
  qualified <- type
  last <- tryCatch(reticulate::py_last_error(), error = function(err) NULL)
  exc <- if (!is.null(last)) attr(last, "exception", exact = TRUE)
  if (!is.null(last) && identical(last$type, sub(".*\\.", "", type)) && !is.null(exc)) {
    info <- tryCatch(pk_env$module$errors$class_chain(exc), error = function(err) NULL)
    if (!is.null(info)) {
      chain <- unlist(info[[1]])
      qualified <- info[[2]]
    }
  }
  structure(
    class = c(paste0("privatekeras_", chain), "privatekeras_error", "error", "condition"),
    list(message = body, call = call, python_class = qualified)
  )
}

# Python's `privatekeras` logger follows getOption("privatekeras.verbose") (default TRUE).
sync_verbosity <- function() {
  verbose <- getOption("privatekeras.verbose", TRUE)
  if (identical(verbose, pk_env$verbose)) return(invisible())
  level <- verbosity_level(verbose)
  ok <- tryCatch({
    pk_env$module$set_verbosity(level)
    TRUE
  }, error = function(e) FALSE)
  if (ok) pk_env$verbose <- verbose
  invisible()
}

verbosity_level <- function(verbose) {
  if (isTRUE(verbose)) return(TRUE)
  if (isFALSE(verbose)) return(FALSE)
  if (is.character(verbose) && length(verbose) == 1L && !is.na(verbose)) return(verbose)
  stop("option `privatekeras.verbose` must be TRUE, FALSE, \"quiet\" or a logging level ",
       "such as \"WARNING\"; got ", deparse1(verbose), call. = FALSE)
}
