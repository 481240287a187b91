#' Secret-share a Keras model onto a cluster
#'
#' Converts the model layer by layer (the layers listed in the README's
#' "Supported layers"; anything else is an error of class
#' `privatekeras_UnsupportedLayerError` naming the layer), encodes and
#' secret-shares every weight in this R session, and uploads to each worker
#' only its own shares with the model's public spec (architecture and shapes).
#' Nothing in clear leaves this process. A final softmax or sigmoid is not
#' computed privately: clients apply it (`query(..., activation = TRUE)`).
#' Worker 0 then traces the private step and runs it once on zeros (10-30 s),
#' so [serve()] answers its first query at full speed.
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
#' @param input_range `NULL` or `c(lo, hi)`: the values the model's inputs
#'   take, e.g. `c(0, 1)` for images scaled to `[0, 1]`. Every value of the
#'   private evaluation is bounded from it and the weights, and a model that
#'   could leave the fixed-point range is refused here (an error of class
#'   `privatekeras_OutOfRangeError`); clients refuse inputs outside it before
#'   sending anything. `NULL` assumes the encoding's whole range (+-2048), for
#'   which larger models are refused: declare the real range.
#' @return A `pk_shared_model`; pass it to [serve()].
#' @family owner
#' @seealso [serve()], the next step; [pk_cluster()] and [pk_start()] before it;
#'   [connect()] for the client's side.
#' @examples
#' # A small Keras model built through reticulate (R's keras3 builds the same
#' # objects), shared onto three real workers started here (~20 s).
#' if (pk_available("all")) {
#'   keras <- reticulate::import("keras")
#'   model <- keras$Sequential(list(
#'     keras$Input(shape = list(4L), batch_size = 1L),
#'     keras$layers$Dense(8L, activation = "relu"),
#'     keras$layers$Dense(3L, activation = "softmax")
#'   ))
#'   cl <- pk_cluster(c("localhost:4700", "localhost:4701", "localhost:4702"))
#'   pk_start(cl)
#'   sm <- share(model, cl, input_range = c(0, 1))
#'   print(sm)     # shapes, final activation (applied by clients), state
#'   pk_stop(cl)
#' }
#' @export
share <- function(model, cluster, protocol = cluster$protocol, batch_size = NULL,
                  max_group = 1L, input_range = NULL) {
  check_cluster(cluster)
  if (inherits(cluster, "pk_server")) return(share_ckks(model, cluster, input_range))
  batch_size <- check_count(batch_size, "batch_size")
  if (!is.null(batch_size) && batch_size < 1L) stop("`batch_size` must be >= 1", call. = FALSE)
  max_group <- check_count(max_group, "max_group", allow_null = FALSE)
  if (max_group < 1L || max_group > 16L) {
    stop("`max_group` must be a whole number in 1..16", call. = FALSE)
  }
  input_range <- check_range_arg(input_range)
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
                                max_group = max_group, input_range = input_range))
  structure(list(py = py, cluster = cluster), class = "pk_shared_model")
}

check_range_arg <- function(input_range) {
  if (is.null(input_range)) return(NULL)
  ok <- is.numeric(input_range) && length(input_range) == 2L && all(is.finite(input_range)) &&
    input_range[[1]] < input_range[[2]]
  if (!ok) {
    stop("`input_range` must be NULL or two finite numbers c(lo, hi) with lo < hi, e.g. ",
         "c(0, 1); got ", deparse1(input_range), call. = FALSE)
  }
  reticulate::tuple(as.numeric(input_range[[1]]), as.numeric(input_range[[2]]))
}

#' @export
print.pk_shared_model <- function(x, ...) {
  py <- x$py
  cat("<privatekeras shared model> '", py$spec$name, "'\n", sep = "")
  cat("  protocol     ", py$protocol, "\n", sep = "")
  cat("  input shape  ", paste(unlist(py$input_shape), collapse = " x "), "\n", sep = "")
  cat("  output shape ", paste(unlist(py$output_shape), collapse = " x "),
      if (!is.null(py$spec$output_activation))
        paste0(" (", py$spec$output_activation, " applied by the client)"), "\n", sep = "")
  cat("  state        ", if (isTRUE(py$serving)) "serving" else "not serving",
      ", ", py$served, " queries answered\n", sep = "")
  cat("  workers      ", paste(x$cluster$hosts, collapse = ", "), "\n", sep = "")
  invisible(x)
}
