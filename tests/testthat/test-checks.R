# Argument checks done in R before Python is touched, and Python errors reaching
# R with their own message.

test_that("hosts are checked in R", {
  expect_error(pk_cluster(c("localhost:4000", "localhost:4001")), "exactly 3")
  expect_error(pk_cluster(c("localhost:4000", "localhost", "localhost:4002")), "has no port")
  expect_error(pk_cluster(rep("localhost:4000", 3)), "distinct")
  expect_error(pk_cluster(1:3), "character vector")
})

test_that("shapes and counts are checked in R", {
  expect_error(privatekeras:::check_shape(c(1, 28.5), "input_shape"), "positive whole numbers")
  expect_error(privatekeras:::check_shape(c(1, NA), "input_shape"), "positive whole numbers")
  expect_error(privatekeras:::check_shape(10, "output_shape"), "at least two")
  expect_identical(privatekeras:::check_shape(c(1, 28, 28, 1), "x"), c(1L, 28L, 28L, 1L))
  expect_error(privatekeras:::check_count(-1, "num_requests"), "non-negative whole number")
  expect_error(privatekeras:::check_count(c(1, 2), "num_requests"), "single")
  expect_null(privatekeras:::check_count(NULL, "num_requests"))
})

test_that("query inputs are checked in R", {
  shape <- c(1L, 4L, 4L, 1L)
  ok <- array(runif(16), c(1, 4, 4, 1))
  expect_equal(dim(privatekeras:::check_input(ok, shape)), c(1L, 4L, 4L, 1L))
  expect_equal(dim(privatekeras:::check_input(array(0, c(4, 4, 1)), shape)), c(1L, 4L, 4L, 1L))
  expect_equal(dim(privatekeras:::check_input(array(0, c(5, 4, 4, 1)), shape)), c(5L, 4L, 4L, 1L))
  expect_error(privatekeras:::check_input(array(0, c(1, 4, 3, 1)), shape),
               "has dimensions c\\(1L, 4L, 3L, 1L\\).*drop = FALSE")
  expect_error(privatekeras:::check_input(array("a", c(1, 4, 4, 1)), shape), "numeric array")
  expect_error(privatekeras:::check_input(array(TRUE, c(1, 4, 4, 1)), shape), "numeric array")
  bad <- ok
  bad[2] <- NA
  expect_error(privatekeras:::check_input(bad, shape), "NA, NaN or infinite")
  bad[2] <- Inf
  expect_error(privatekeras:::check_input(bad, shape), "NA, NaN or infinite")
  expect_error(privatekeras:::check_input(array(0, c(0, 4, 4, 1)), shape), "empty batch")
})

test_that("verbs refuse objects of the wrong kind", {
  expect_error(pk_start(list()), "made by pk_cluster")
  expect_error(serve(42), "made by share")
  expect_error(query("client", 1), "made by connect")
})

test_that("Python errors reach R with the same message and a class", {
  skip_if_no_privatekeras()
  keras <- reticulate::import("keras")
  model <- keras$Sequential(list(keras$Input(shape = c(6L, 4L)), keras$layers$LSTM(3L)))
  cl <- pk_cluster(free_hosts())
  err <- tryCatch(share(model, cl), error = function(e) e)
  expect_s3_class(err, "privatekeras_UnsupportedLayerError")
  expect_match(conditionMessage(err), "LSTM.*is not supported.*Supported layers:")
  junk <- tempfile(fileext = ".keras")
  writeLines("not a model", junk)
  expect_error(share(junk, cl), "could not load a Keras model")
  expect_error(share(list(1), cl), "must be a Keras model")
  expect_error(share(tempfile(fileext = ".keras"), cl), "not an existing")
  expect_error(share(junk, cl, max_group = 0), "in 1..16")
  expect_error(share(junk, cl, max_group = 2.5), "whole number")
})

test_that("a port in use is a clear error and leaves nothing running", {
  skip_if_no_privatekeras()
  hosts <- free_hosts()
  busy <- serverSocket(as.integer(sub(".*:", "", hosts[[2]])))
  on.exit(close(busy))
  before <- worker_count()
  err <- tryCatch(pk_start(pk_cluster(hosts)), error = function(e) e)
  expect_s3_class(err, "privatekeras_PortInUseError")
  expect_match(conditionMessage(err), "already in use")
  expect_equal(worker_count(), before)
})

test_that("install_privatekeras() refuses a missing Python", {
  expect_error(install_privatekeras(python = "/nonexistent/python3"), "no Python 3 found")
})

test_that("connecting to a cluster that is not running fails within the timeout", {
  skip_if_no_privatekeras()
  cl <- pk_cluster(free_hosts(), auto_managed = FALSE)
  # Never started here: no credentials for it (connect() waits for them until the timeout).
  t0 <- Sys.time()
  err <- tryCatch(connect(cl, c(1, 28, 28, 1), c(1, 10), timeout = 2), error = function(e) e)
  expect_s3_class(err, "privatekeras_CredentialsError")
  expect_match(conditionMessage(err), "not started by this user.*pk_start\\(\\)")
  expect_lt(as.numeric(difftime(Sys.time(), t0, units = "secs")), 15)
  # Its credentials exist (as `privatekeras pki --hosts` makes them), no worker listens.
  pki <- reticulate::import("privatekeras.deploy.pki")
  key <- cl$py$`_local_key`()
  pki$make_local(key)
  on.exit(pki$remove_local(key), add = TRUE)
  t0 <- Sys.time()
  err <- tryCatch(connect(cl, c(1, 28, 28, 1), c(1, 10), timeout = 2), error = function(e) e)
  expect_s3_class(err, "privatekeras_WorkerUnavailableError")
  expect_match(conditionMessage(err), "is the cluster started\\?")
  expect_lt(as.numeric(difftime(Sys.time(), t0, units = "secs")), 20)
  expect_identical(conditionCall(err)[[1]], as.name("connect"))
})

test_that("SecureNN and Pond are refused with the Python core's reason", {
  skip_if_no_privatekeras()
  err <- tryCatch(pk_cluster(free_hosts(), protocol = "securenn"), error = function(e) e)
  expect_s3_class(err, "privatekeras_ValueError")
  expect_match(conditionMessage(err), "'securenn' is withdrawn.*worker 2 learns")
  expect_error(pk_cluster(free_hosts(), protocol = "pond"), "'pond' is not offered")
  expect_error(pk_cluster(free_hosts(), protocol = c("aby3", "securenn")), "single string")
  cl <- pk_cluster(free_hosts())
  expect_equal(cl$protocol, "aby3")
  expect_error(share(tempfile(), cl), "not an existing")
  junk <- tempfile(fileext = ".keras")
  writeLines("not a model", junk)
  expect_error(share(junk, cl, protocol = "securenn"), "'securenn' is withdrawn")
})

test_that("processes started from R survive while gRPC is busy in this R process", {
  # R forks its children (processx, callr); with gRPC's fork support on, such a child could
  # die of SIGABRT before exec. library(privatekeras) turns that support off.
  skip_if_no_privatekeras()
  skip_if_not_installed("processx")
  expect_equal(Sys.getenv("GRPC_ENABLE_FORK_SUPPORT"), "false")
  reticulate::py_run_string(paste(
    "import grpc, threading",
    "from concurrent import futures",
    "pk_srv = grpc.server(futures.ThreadPoolExecutor(2))",
    "pk_port = pk_srv.add_insecure_port('127.0.0.1:0')",
    "pk_srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler('t.T', {'Echo':",
    "    grpc.unary_unary_rpc_method_handler(lambda r, c: r)}),))",
    "pk_srv.start()",
    "pk_ch = grpc.insecure_channel('127.0.0.1:%d' % pk_port)",
    "pk_echo = pk_ch.unary_unary('/t.T/Echo')",
    "pk_busy = threading.Event()",
    "def pk_loop():",
    "    while not pk_busy.is_set():",
    "        pk_echo(b'x', timeout=5)",
    "pk_threads = [threading.Thread(target=pk_loop, daemon=True) for _ in range(2)]",
    "[t.start() for t in pk_threads]", sep = "\n"))
  on.exit(reticulate::py_run_string(
    "pk_busy.set(); [t.join() for t in pk_threads]; pk_ch.close(); pk_srv.stop(None)"),
    add = TRUE)
  status <- vapply(1:200, function(i) processx::run("true", error_on_status = FALSE)$status,
                   numeric(1))
  expect_equal(sum(status != 0), 0)
})
