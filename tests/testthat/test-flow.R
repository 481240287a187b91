# The whole flow from R against real workers; private logits are compared with
# plaintext Keras. One R process can join one cluster (a TensorFlow limit), so
# this session is first the model owner, then a client, of the same cluster.

test_that("R owner and R client (separate processes) agree with plaintext Keras", {
  skip_if_no_privatekeras()
  skip_if_not_installed("callr")
  m <- tutorial_model()
  hosts <- free_hosts()
  cl <- pk_cluster(hosts)
  expect_output(print(cl), "stopped")
  pk_start(cl)
  on.exit(pk_stop(cl), add = TRUE)
  expect_output(print(cl), "worker2 .* running, pid [0-9]+")
  expect_output(print(cl), "loopback only")

  sm <- share(m$path, cl)
  expect_s3_class(sm, "pk_shared_model")
  expect_output(print(sm), "input shape  1 x 28 x 28 x 1")
  expect_output(print(sm), "not serving, 0 queries answered")

  client <- callr::r_bg(function(hosts, images) {
    library(privatekeras)
    cl <- pk_cluster(hosts, auto_managed = FALSE)
    client <- connect(cl, c(1, 28, 28, 1), c(1, 10), timeout = 120)
    q <- query(client, images[1:3, , , , drop = FALSE])    # three images, batch 1 each
    p <- predict_proba(client, images[4, , , , drop = FALSE])
    list(q = q, p = p, printed = capture.output(print(client)))
  }, args = list(hosts = hosts, images = m$images))
  n <- serve(sm, num_requests = 4, idle_timeout = 180)
  client$wait(60000)
  res <- client$get_result()
  expect_equal(n, 4L)
  expect_output(print(sm), "4 queries answered")
  expect_private_matches(res$q, m$logits[1:3, , drop = FALSE])
  plain_p <- exp(m$logits[4, ]) / sum(exp(m$logits[4, ]))
  expect_equal(sum(res$p), 1, tolerance = 1e-5)
  expect_lt(max(abs(res$p[1, ] - plain_p)), 0.01)
  expect_match(paste(res$printed, collapse = "\n"), "served model aby3, batch 1")

  # Now this session is the client, of a model served (batch 2) by another process.
  owner <- callr::r_bg(function(hosts, path) {
    library(privatekeras)
    cl <- pk_cluster(hosts, auto_managed = FALSE)
    sm <- share(path, cl, batch_size = 2)
    n <- serve(sm, num_requests = 2, idle_timeout = 180)
    stop_serving(sm)
    n
  }, args = list(hosts = hosts, path = m$path_any))
  cl_client <- pk_cluster(hosts, auto_managed = FALSE)
  client <- connect(cl_client, c(2, 28, 28, 1), c(2, 10), timeout = 120)
  expect_output(print(client), "input shape  2 x 28 x 28 x 1")
  q <- query(client, m$images[1:3, , , , drop = FALSE])  # 3 rows: two batches, one padded
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

  # Detached from the cluster, plain Keras runs locally again.
  expect_invisible(disconnect(late))
  expect_equal(dim(m$model$predict(m$images[1:2, , , , drop = FALSE], verbose = 0L)), c(2L, 10L))

  pk_stop(cl)
  expect_output(print(cl), "stopped")
})
