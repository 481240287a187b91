#' Secret-share a Keras model onto a cluster
#'
#' Converts the model layer by layer (Conv2D, Dense, pooling, ReLU, Flatten,
#' Reshape, BatchNormalization folded, Dropout; a final softmax is applied by
#' the client), encodes and secret-shares every weight in this R session, and
#' uploads to each worker only its own shares with the model's public spec
#' (architecture and shapes). Nothing in clear leaves this process. Worker 0
#' then traces the private step and runs it once on zeros (10-30 s), so
#' [serve()] answers its first query at full speed.
#'
#' @param model An R keras/keras3 model, a Keras model made through
#'   reticulate, or the path of a `.keras`/`.h5` file.
#' @param cluster A started [pk_cluster()].
#' @param protocol `"aby3"` (the default, the cluster's, and the only one
#'   offered; `"securenn"` is refused with the Python core's error).
#' @param batch_size Images per private evaluation; defaults to the model's
#'   fixed batch size, else 1.
#' @param max_group When several clients' queries are waiting, evaluate up to
#'   this many in one private step (more throughput under concurrent load; each
#'   answer still goes only to its client; costs a second trace). 1 evaluates
#'   one query at a time.
#' @return A `pk_shared_model`; pass it to [serve()].
#' @examples
#' \dontrun{
#' sm <- share("model.keras", cl)
#' serve(sm, num_requests = 3)
#' }
#' @export
share <- function(model, cluster, protocol = cluster$protocol, batch_size = NULL,
                  max_group = 1L) {
  check_cluster(cluster)
  batch_size <- check_count(batch_size, "batch_size")
  if (!is.null(batch_size) && batch_size < 1L) stop("`batch_size` must be >= 1", call. = FALSE)
  max_group <- check_count(max_group, "max_group", allow_null = FALSE)
  if (max_group < 1L || max_group > 16L) {
    stop("`max_group` must be a whole number in 1..16", call. = FALSE)
  }
  if (is.character(model)) {
    if (length(model) != 1L || !file.exists(model)) {
      stop("`model` is not an existing .keras/.h5 file: ", deparse1(model), call. = FALSE)
    }
    model <- normalizePath(model)
  } else if (!inherits(model, "python.builtin.object")) {
    stop("`model` must be a Keras model (keras3, keras or reticulate) or a .keras/.h5 path; ",
         "got an object of class ", paste(class(model), collapse = "/"), call. = FALSE)
  }
  py <- pk_call(pk_core()$share(model, cluster$py, protocol = protocol, batch_size = batch_size,
                                max_group = max_group))
  structure(list(py = py, cluster = cluster), class = "pk_shared_model")
}

#' @export
print.pk_shared_model <- function(x, ...) {
  py <- x$py
  cat("<privatekeras shared model> '", py$spec$name, "'\n", sep = "")
  cat("  protocol     ", py$protocol, "\n", sep = "")
  cat("  input shape  ", paste(unlist(py$input_shape), collapse = " x "), "\n", sep = "")
  cat("  output shape ", paste(unlist(py$output_shape), collapse = " x "),
      if (!is.null(py$spec$output_activation)) " (softmax applied by the client)", "\n", sep = "")
  cat("  state        ", if (isTRUE(py$serving)) "serving" else "not serving",
      ", ", py$served, " queries answered\n", sep = "")
  cat("  workers      ", paste(x$cluster$hosts, collapse = ", "), "\n", sep = "")
  invisible(x)
}
