#' privatekeras: private predictions from Keras models
#'
#' A model owner secret-shares a trained Keras model's weights among three
#' workers, which run the ABY3 three-party computation protocol and answer
#' private queries; a client secret-shares its input locally and alone
#' reconstructs the logits. Only the three workers compute: the owner and the
#' clients reach them through a small authenticated API (gRPC with mutual
#' TLS), and a client needs no TensorFlow.
#'
#' The verbs mirror the Python core one to one: [pk_cluster()], [pk_start()],
#' [pk_stop()], [share()], [serve()], [stop_serving()], [connect()], [query()],
#' [predict_proba()], [disconnect()]. [install_privatekeras()] sets up the
#' Python side once (`role = "client"` for a client-only environment).
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
#' @examples
#' \dontrun{
#' sy <- pk_python()
#' hook <- sy$KerasHook(reticulate::import("tensorflow")$keras)
#' }
#' @export
pk_python <- function() pk_core()

# Run a call into Python; a Python exception becomes an R error with the same
# message and a class naming the Python exception.
pk_call <- function(expr) {
  caller <- sys.call(-1)  # the verb that called pk_call(), for the R error's call
  tryCatch(expr, error = function(e) {
    if (!inherits(e, "Rcpp::exception") && !inherits(e, "python.builtin.object")) stop(e)
    msg <- conditionMessage(e)
    first <- sub("\n.*", "", msg)
    cls <- sub("^([A-Za-z_][A-Za-z0-9_.]*):.*$", "\\1", first)
    if (identical(cls, first)) {
      stop(e)
    }
    body <- sub("^[A-Za-z_][A-Za-z0-9_.]*: ?", "", msg)
    body <- sub("\n+$", "", body)
    short <- sub(".*\\.", "", cls)
    stop(structure(
      class = c(paste0("privatekeras_", short), "privatekeras_error", "error", "condition"),
      list(message = body, call = caller, python_class = cls)
    ))
  })
}
