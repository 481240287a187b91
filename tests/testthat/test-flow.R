# The whole flow from R against real workers; private logits are compared with
# plaintext Keras. This session is first the model owner (a client in another R
# process), then a client of a model served by another R process, of the same cluster.

test_that("R owner and R client (separate processes) agree with plaintext Keras", {
  skip_if_no_privatekeras()
  skip_if_not_installed("callr")
  m <- tutorial_model()
  hosts <- free_hosts()
  cl <- pk_cluster(hosts)
  expect_output(print(cl), "stopped")
  pk_start(cl)
  on.exit(pk_stop(cl), add = TRUE)
  expect_equal(worker_count(), 3L)
  expect_output(print(cl), "worker2 .* running, pid [0-9]+")
  expect_output(print(cl), "APIs \\(mutual TLS\\) on loopback only")
  expect_output(print(cl), "workers' TensorFlow ports on loopback only")

  sm <- share(m$path_softmax, cl, input_range = c(0, 1))   # clients apply the softmax
  expect_s3_class(sm, "pk_shared_model")
  expect_output(print(sm), "input shape  1 x 28 x 28 x 1")
  expect_output(print(sm), "not serving, 0 queries answered")
  expect_output(print(sm), "softmax applied by the client")

  client <- callr::r_bg(function(hosts, images) {
    library(privatekeras)
    cl <- pk_cluster(hosts, auto_managed = FALSE)
    client <- connect(cl, c(1, 28, 28, 1), c(1, 10), timeout = 120)
    q <- query(client, images[1:2, , , , drop = FALSE])    # two images, batch 1 each
    disconnect(client)                                      # forgets the connection ...
    q <- rbind(q, query(client, images[3, , , , drop = FALSE]))  # ... a query reconnects
    p <- query(client, images[4, , , , drop = FALSE], activation = TRUE)
    list(q = q, p = p, printed = capture.output(print(client)),
         tf = reticulate::py_eval("__import__('sys').modules.get('tensorflow') is not None"))
  }, args = list(hosts = hosts, images = m$images))
  n <- tryCatch(serve(sm, num_requests = 4, idle_timeout = 180), error = function(e) e)
  client$wait(60000)
  if (inherits(n, "error")) {
    stop("serve: ", conditionMessage(n), "\n--- client:\n",
         paste(client$read_all_error_lines(), collapse = "\n"), "\n", cluster_logs(cl),
         call. = FALSE)
  }
  res <- client$get_result()
  expect_equal(n, 4L)
  expect_output(print(sm), "4 queries answered")
  expect_private_matches(res$q, m$logits[1:3, , drop = FALSE])
  # activation = TRUE: the model's own softmax, applied on the client.
  plain_p <- softmax_rows(m$logits[4, , drop = FALSE])
  expect_equal(sum(res$p), 1, tolerance = 1e-5)
  expect_lt(max(abs(res$p - plain_p)), 0.01)
  expect_match(paste(res$printed, collapse = "\n"), "served model aby3, batch 1")
  expect_false(res$tf)  # the client process never imported TensorFlow

  # Now this session is the client, of a model served (batch 2) by another process.
  owner <- callr::r_bg(function(hosts, path) {
    library(privatekeras)
    cl <- pk_cluster(hosts, auto_managed = FALSE)
    sm <- share(path, cl, batch_size = 2, input_range = c(0, 1))
    n <- serve(sm, num_requests = 2, idle_timeout = 180)
    stop_serving(sm)
    n
  }, args = list(hosts = hosts, path = m$path_any))
  cl_client <- pk_cluster(hosts, auto_managed = FALSE)
  client <- connect(cl_client, c(2, 28, 28, 1), c(2, 10), timeout = 300)
  expect_output(print(client), "input shape  2 x 28 x 28 x 1")
  # 3 rows: two batches, one padded. (Waits for the owner to share and serve.)
  q <- tryCatch(query(client, m$images[1:3, , , , drop = FALSE]), error = function(e) e)
  if (inherits(q, "error")) {
    if (owner$is_alive()) owner$kill()
    stop("query: ", conditionMessage(q), "\n--- owner:\n",
         paste(owner$read_all_error_lines(), collapse = "\n"), "\n", cluster_logs(cl),
         call. = FALSE)
  }
  owner$wait(60000)
  expect_equal(owner$get_result(), 2L)
  expect_private_matches(q, m$logits[1:3, , drop = FALSE])

  # Served no more: a clear error within the client's timeout, not a hang.
  late <- connect(cl_client, c(2, 28, 28, 1), c(2, 10), timeout = 3)
  t0 <- Sys.time()
  err <- tryCatch(query(late, m$images[1:2, , , , drop = FALSE]), error = function(e) e)
  expect_s3_class(err, "privatekeras_NotServingError")
  expect_match(conditionMessage(err), "no model is being served")
  expect_lt(as.numeric(difftime(Sys.time(), t0, units = "secs")), 20)
  # Bad input from R never reaches Python.
  expect_error(query(late, m$images[1, 1:27, , , drop = FALSE]), "has dimensions")

  # disconnect() only forgets the connection: this session was never part of the workers'
  # cluster, so plain Keras runs here as before.
  expect_invisible(disconnect(late))
  expect_equal(dim(m$model$predict(m$images[1:2, , , , drop = FALSE], verbose = 0L)), c(2L, 10L))

  pk_stop(cl)
  expect_output(print(cl), "stopped")
  expect_equal(worker_count(), 0L)
})
