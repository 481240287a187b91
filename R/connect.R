#' Connect a client to a served model
#'
#' The client secret-shares each input in this R session (with the operating
#' system's CSPRNG), sends each worker only its own shares through the
#' worker's API (gRPC with mutual TLS), fetches each worker's answer shares
#' with a secret only it knows, and reconstructs the logits here: no worker
#' sees the input or the output. A client runs no TensorFlow: numpy and grpcio
#' are all it needs (`install_privatekeras(role = "client")`).
#'
#' On one machine, a client run by the same user as the model owner finds the
#' cluster's credentials by its addresses, with no configuration; `connect()`
#' waits up to `timeout` seconds for the owner to start the cluster.
#'
#' @param cluster A [pk_cluster()] with the workers' addresses (it need not be
#'   started by this session: use `auto_managed = FALSE`).
#' @param input_shape Shape of one query, batch first, e.g. `c(1, 28, 28, 1)`.
#' @param output_shape Shape of one answer, batch first, e.g. `c(1, 10)`.
#' @param timeout Seconds to wait for the workers (and, on one machine, for
#'   the cluster's credentials), for a served model and for each answer.
#' @return A `pk_client`; pass it to [query()].
#' @family client
#' @seealso [query()], [disconnect()]; [pk_cluster_from_config()] for a
#'   cluster on other hosts.
#' @examples
#' if (pk_available()) {
#'   # No workers listen at these addresses, and nobody started them, so there
#'   # are no credentials either: a classed error within the timeout.
#'   cl <- pk_cluster(c("localhost:4703", "localhost:4704", "localhost:4705"),
#'                    auto_managed = FALSE)
#'   err <- tryCatch(connect(cl, c(1, 28, 28, 1), c(1, 10), timeout = 1),
#'                   privatekeras_PrivateKerasError = function(e) e)
#'   print(class(err))
#'   print(conditionMessage(err))
#' }
#'
#' \dontrun{
#' # A client of a model served by another R session of the same user:
#' cl <- pk_cluster(auto_managed = FALSE)
#' client <- connect(cl, c(1, 28, 28, 1), c(1, 10))
#' query(client, images[1, , , , drop = FALSE])
#' disconnect(client)
#' }
#' @export
connect <- function(cluster, input_shape, output_shape, timeout = 60) {
  check_cluster(cluster)
  if (inherits(cluster, "pk_server")) return(connect_ckks(cluster, timeout))
  input_shape <- check_shape(input_shape, "input_shape")
  output_shape <- check_shape(output_shape, "output_shape")
  if (input_shape[[1]] != output_shape[[1]]) {
    stop("`input_shape` and `output_shape` must have the same batch size (first element)",
         call. = FALSE)
  }
  if (!is.numeric(timeout) || length(timeout) != 1L || is.na(timeout) || timeout <= 0) {
    stop("`timeout` must be a positive number of seconds", call. = FALSE)
  }
  py <- pk_call(pk_core()$connect(cluster$py, py_shape(input_shape), py_shape(output_shape),
                                  timeout = as.numeric(timeout)))
  structure(list(py = py, cluster = cluster, input_shape = input_shape,
                 output_shape = output_shape), class = "pk_client")
}

#' @export
print.pk_client <- function(x, ...) {
  cat("<privatekeras client>\n")
  cat("  input shape  ", paste(x$input_shape, collapse = " x "), "\n", sep = "")
  cat("  output shape ", paste(x$output_shape, collapse = " x "), "\n", sep = "")
  cat("  workers      ", paste(x$cluster$hosts, collapse = ", "), "\n", sep = "")
  spec <- x$py$`_spec`
  if (!is.null(spec)) {
    cat("  served model ", spec$protocol, ", batch ", spec$batch_size, "\n", sep = "")
  }
  invisible(x)
}

#' Disconnect a client from the cluster
#'
#' Forgets the connection and the served model's description; a later
#' [query()] with the same client connects again. Nothing else changes in this
#' R session: a client runs no TensorFlow and never joins the workers.
#'
#' @param client A [connect()]ed client.
#' @return The client, invisibly.
#' @family client
#' @seealso [connect()].
#' @examples
#' \dontrun{
#' client <- connect(pk_cluster(auto_managed = FALSE), c(1, 28, 28, 1), c(1, 10))
#' query(client, images[1, , , , drop = FALSE])
#' disconnect(client)
#' }
#' @export
disconnect <- function(client) {
  check_client(client)
  pk_call(client$py$close())
  invisible(client)
}
