#' Serve private predictions
#'
#' `serve()` answers queries from clients (see [connect()]) until
#' `num_requests` have been answered, then returns once the last answer has
#' been collected. With `num_requests = NULL` it serves until interrupted.
#' It blocks the R session: run it in a background process (e.g. with callr)
#' when the same session must do other work. `stop_serving()` withdraws the
#' model so that clients get a clear error instead of waiting.
#'
#' @param shared_model A [share()]d model.
#' @param num_requests How many queries to answer, or `NULL` for no limit.
#' @return `serve()`: the number of queries answered, invisibly.
#'   `stop_serving()`: the shared model, invisibly.
#' @export
serve <- function(shared_model, num_requests = NULL) {
  check_shared(shared_model)
  num_requests <- check_count(num_requests, "num_requests")
  n <- pk_call(shared_model$py$serve(num_requests = num_requests))
  invisible(n)
}

#' @rdname serve
#' @export
stop_serving <- function(shared_model) {
  check_shared(shared_model)
  pk_call(shared_model$py$stop())
  invisible(shared_model)
}

check_shared <- function(x) {
  if (!inherits(x, "pk_shared_model")) {
    stop("`shared_model` must be made by share(); got an object of class ",
         paste(class(x), collapse = "/"), call. = FALSE)
  }
}
