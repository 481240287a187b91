#' Query a served model privately
#'
#' `query()` returns the logits; `predict_proba()` applies a softmax to them
#' here, on the client. `x` may hold one item (dimensions `input_shape[-1]`)
#' or several (first dimension); they are sent in batches of the served batch
#' size.
#'
#' @param client A [connect()]ed client.
#' @param x A numeric array, e.g. `images[1, , , , drop = FALSE]`.
#' @return A numeric matrix with one row per item of `x`.
#' @export
query <- function(client, x) {
  check_client(client)
  x <- check_input(x, client$input_shape)
  out <- pk_call(client$py$query(x))
  as_logit_matrix(out)
}

#' @rdname query
#' @export
predict_proba <- function(client, x) {
  check_client(client)
  x <- check_input(x, client$input_shape)
  as_logit_matrix(pk_call(client$py$predict_proba(x)))
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
