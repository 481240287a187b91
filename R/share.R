#' Secret-share a Keras model onto a cluster
#'
#' Converts the model layer by layer (Conv2D, Dense, pooling, ReLU, Flatten,
#' Reshape, BatchNormalization folded, Dropout; a final softmax is applied by
#' the client) and secret-shares every weight from this R session onto the
#' three workers. Nothing in clear leaves this process.
#'
#' @param model An R keras/keras3 model, a Keras model made through
#'   reticulate, or the path of a `.keras`/`.h5` file.
#' @param cluster A started [pk_cluster()].
#' @param protocol `"aby3"` or `"securenn"`; defaults to the cluster's.
#' @param batch_size Images per private evaluation; defaults to the model's
#'   fixed batch size, else 1.
#' @return A `pk_shared_model`; pass it to [serve()].
#' @examples
#' \dontrun{
#' sm <- share("model.keras", cl)
#' serve(sm, num_requests = 3)
#' }
#' @export
share <- function(model, cluster, protocol = cluster$protocol, batch_size = NULL) {
  check_cluster(cluster)
  batch_size <- check_count(batch_size, "batch_size")
  if (!is.null(batch_size) && batch_size < 1L) stop("`batch_size` must be >= 1", call. = FALSE)
  if (is.character(model)) {
    if (length(model) != 1L || !file.exists(model)) {
      stop("`model` is not an existing .keras/.h5 file: ", deparse1(model), call. = FALSE)
    }
    model <- normalizePath(model)
  } else if (!inherits(model, "python.builtin.object")) {
    stop("`model` must be a Keras model (keras3, keras or reticulate) or a .keras/.h5 path; ",
         "got an object of class ", paste(class(model), collapse = "/"), call. = FALSE)
  }
  py <- pk_call(pk_core()$share(model, cluster$py, protocol = protocol, batch_size = batch_size))
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
