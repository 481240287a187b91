#' Query a served model privately
#'
#' Secret-shares `x` in this R session, sends each worker only its own shares,
#' and rebuilds the answer here from the workers' answer shares: no worker
#' sees the input or the answer. `x` may hold one item (dimensions
#' `input_shape[-1]`) or several (first dimension); they travel in batches of
#' the served batch size (the last one padded with zeros that are dropped
#' here). Non-numeric values, `NA`/`NaN`/`Inf` and wrong dimensions are refused
#' in R before anything is sent; values outside the input range the model
#' owner declared (see [share()]) are refused before anything is sent too.
#'
#' By default the answer is the model's output before its final activation
#' (the logits of a softmax or sigmoid model), computed privately.
#' `activation = TRUE` then applies the model's own final activation (softmax,
#' sigmoid, or none for a linear output) here, on the client, so the result is
#' what Keras's `predict()` returns for the model in clear, e.g. class
#' probabilities.
#'
#' @param client A [connect()]ed client.
#' @param x A numeric array, e.g. `images[1, , , , drop = FALSE]`.
#' @param activation `FALSE` (the default) for the output before the model's
#'   final activation; `TRUE` to apply that activation on the client.
#' @return A numeric matrix with one row per item of `x` (an array for models
#'   whose output has more than one dimension per item).
#' @family client
#' @seealso [connect()] to make the client; [serve()] for the other side.
#' @examples
#' # query() needs a model served by running workers, so it is not run here;
#' # the vignette "Private predictions in ten lines" runs the whole flow (owner
#' # and client) whenever the package's vignettes are built.
#' try(query("not a client", array(0, c(1, 28, 28, 1))))
#'
#' \dontrun{
#' client <- connect(pk_cluster(auto_managed = FALSE), c(1, 28, 28, 1), c(1, 10))
#' logits <- query(client, images[1, , , , drop = FALSE])
#' probabilities <- query(client, images[1:3, , , , drop = FALSE], activation = TRUE)
#' disconnect(client)
#' }
#' @export
query <- function(client, x, activation = FALSE) {
  check_client(client)
  if (inherits(client, "pk_ckks_client")) return(query_ckks(client, x, activation))
  if (!is.logical(activation) || length(activation) != 1L || is.na(activation)) {
    stop("`activation` must be TRUE or FALSE", call. = FALSE)
  }
  x <- check_input(x, client$input_shape)
  out <- if (activation) pk_call(client$py$predict_proba(x)) else pk_call(client$py$query(x))
  as_logit_matrix(out)
}

as_logit_matrix <- function(out) {
  if (inherits(out, "python.builtin.object")) out <- reticulate::py_to_r(out)
  d <- dim(out)
  if (length(d) == 2L) return(matrix(as.double(out), nrow = d[[1]]))
  array(as.double(out), dim = d)
}

check_client <- function(x) {
  if (!inherits(x, "pk_client")) {
    stop("`client` must be made by connect(); got an object of class ",
         paste(class(x), collapse = "/"), call. = FALSE)
  }
}
