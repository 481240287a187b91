#' Serve private predictions
#'
#' `serve()` asks worker 0 to answer queries from clients (see [connect()])
#' until `num_requests` have been answered, then returns once the last answer
#' has been collected. With `num_requests = NULL` it serves until interrupted
#' or until `stop_serving()`. The workers alone compute; this session only
#' holds the serving call open: if it ends, worker 0 stops serving and waiting
#' clients get an error saying the owner is gone. `serve()` blocks the R
#' session: run it in a background process (e.g. with callr) when the same
#' session must do other work. `stop_serving()` ends serving, so that clients
#' get a clear error instead of waiting.
#'
#' @param shared_model A [share()]d model.
#' @param num_requests How many queries to answer, or `NULL` for no limit.
#' @param idle_timeout Seconds to wait for the next query before returning
#'   early, or `NULL` to wait indefinitely.
#' @return `serve()`: the number of queries answered, invisibly.
#'   `stop_serving()`: the shared model, invisibly.
#' @family owner
#' @seealso [share()] before it; [connect()] and [query()] for the clients.
#' @examples
#' # Checked in R before anything reaches the workers:
#' try(serve("not a shared model"))
#'
#' \dontrun{
#' # The model owner's R session (a client queries from another session; the
#' # vignette "Private predictions in ten lines" runs both):
#' cl <- pk_cluster(c("localhost:4000", "localhost:4001", "localhost:4002"))
#' pk_start(cl)
#' sm <- share("model.keras", cl, input_range = c(0, 1))
#' serve(sm, num_requests = 3)   # blocks until three queries are answered
#' pk_stop(cl)
#' }
#' @export
serve <- function(shared_model, num_requests = NULL, idle_timeout = NULL) {
  check_shared(shared_model)
  num_requests <- check_count(num_requests, "num_requests")
  if (!is.null(idle_timeout) &&
      (!is.numeric(idle_timeout) || length(idle_timeout) != 1L || is.na(idle_timeout) ||
       idle_timeout <= 0)) {
    stop("`idle_timeout` must be a positive number of seconds or NULL", call. = FALSE)
  }
  n <- pk_call(shared_model$py$serve(
    num_requests = num_requests,
    idle_timeout = if (is.null(idle_timeout)) NULL else as.numeric(idle_timeout)
  ))
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
