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
  cl <- pk_cluster(hosts)
  err <- tryCatch(pk_start(cl), error = function(e) e)
  # Every class of the Python exception's hierarchy, most specific first.
  expect_s3_class(err, "privatekeras_PortInUseError")
  expect_equal(class(err)[1:3], c("privatekeras_PortInUseError", "privatekeras_ClusterError",
                                  "privatekeras_PrivateKerasError"))
  expect_equal(utils::tail(class(err), 2), c("error", "condition"))
  expect_equal(err$python_class, "privatekeras.errors.PortInUseError")
  # So a handler for the base class catches it.
  caught <- tryCatch(pk_start(cl), privatekeras_ClusterError = function(e) "cluster error")
  expect_equal(caught, "cluster error")
  # The message is Python's, the call is the user's.
  expect_match(conditionMessage(err), "^port [0-9]+ \\(localhost:[0-9]+\\) is already in use")
  expect_identical(conditionCall(err), quote(pk_start(cl)))
  printed <- tryCatch(stop(err), error = function(e) paste(capture.output(print(e)), collapse = ""))
  expect_match(printed, "^<privatekeras_PortInUseError in pk_start\\(cl\\): port")
  expect_equal(worker_count(), before)
})

test_that("an error raised in a nested call shows the call the user typed", {
  skip_if_no_privatekeras()
  # connect() is called by the user's helper function: the call shown is connect(...), the
  # outermost privatekeras function on the stack, not an internal frame (tryCatchOne etc.).
  my_client <- function(hosts) {
    connect(pk_cluster(hosts, auto_managed = FALSE), c(1, 2), c(1, 2), timeout = 0.5)
  }
  err <- tryCatch(my_client(free_hosts()), error = function(e) e)
  expect_s3_class(err, "privatekeras_CredentialsError")
  expect_s3_class(err, "privatekeras_ClusterError")
  expect_identical(conditionCall(err)[[1]], as.name("connect"))
  expect_false(any(grepl("tryCatch", deparse(conditionCall(err)))))
  # A Python exception that is not privatekeras' keeps its own hierarchy.
  err <- tryCatch(pk_cluster(free_hosts(), protocol = "securenn"), error = function(e) e)
  expect_equal(class(err)[1:2], c("privatekeras_ValueError", "privatekeras_Exception"))
  expect_identical(conditionCall(err)[[1]], as.name("pk_cluster"))
})

test_that("KernelsMissingError is a PrivateKerasError in Python and in R", {
  skip_if_no_privatekeras()
  pk <- pk_python()
  builtins <- reticulate::import_builtins()
  expect_true(builtins$issubclass(pk$KernelsMissingError, pk$PrivateKerasError))
  expect_true(builtins$issubclass(pk$KernelsMissingError, builtins$RuntimeError))
  kernels <- reticulate::import("privatekeras.kernels")
  expect_true(builtins$issubclass(kernels$KernelsMissingError, pk$PrivateKerasError))
  # Raised through the R layer: the whole chain as condition classes.
  raise <- reticulate::py_eval("lambda cls, msg: (_ for _ in ()).throw(cls(msg))")
  err <- tryCatch(privatekeras:::pk_call(raise(pk$KernelsMissingError, "kernels not built")),
                  error = function(e) e)
  expect_equal(class(err)[1:3], c("privatekeras_KernelsMissingError",
                                  "privatekeras_PrivateKerasError", "privatekeras_RuntimeError"))
  expect_equal(conditionMessage(err), "kernels not built")
  expect_null(conditionCall(err))  # not called from a privatekeras function: no call
})

test_that("new arguments are checked in R", {
  expect_error(privatekeras:::check_range_arg(c(1, 0)), "lo < hi")
  expect_error(privatekeras:::check_range_arg(c(0, Inf)), "two finite numbers")
  expect_error(privatekeras:::check_range_arg(1), "two finite numbers")
  expect_error(privatekeras:::check_range_arg("0,1"), "two finite numbers")
  expect_null(privatekeras:::check_range_arg(NULL))
  client <- structure(list(input_shape = c(1L, 2L)), class = "pk_client")
  expect_error(query(client, c(1, 2), activation = NA), "TRUE or FALSE")
  expect_error(query(client, c(1, 2), activation = "yes"), "TRUE or FALSE")
  expect_error(pk_cluster_from_config(tempfile(fileext = ".toml"), "owner"), "does not exist")
  expect_error(pk_cluster_from_config(c("a", "b"), "owner"), "path of a hosts file")
  f <- tempfile(fileext = ".toml")
  writeLines("", f)
  expect_error(pk_cluster_from_config(f, NA_character_), "this party's name")
  expect_error(pk_cluster(auto_managed = NA), "TRUE or FALSE")
})

test_that("share() passes input_range to Python as a tuple, checked there too", {
  skip_if_no_privatekeras()
  rng <- privatekeras:::check_range_arg(c(0, 1))
  expect_true(inherits(rng, "python.builtin.tuple"))
  expect_equal(reticulate::py_to_r(rng), list(0, 1))
  keras <- reticulate::import("keras")
  model <- keras$Sequential(list(keras$Input(shape = list(4L), batch_size = 1L),
                                 keras$layers$Dense(3L)))
  cl <- pk_cluster(free_hosts())
  # Beyond the fixed-point encoding: refused by the Python core, before any worker is asked.
  err <- tryCatch(share(model, cl, input_range = c(-1e6, 1e6)), error = function(e) e)
  expect_s3_class(err, "privatekeras_ValueError")
  expect_match(conditionMessage(err), "input_range")
})

test_that("install_privatekeras() checks the Python it is given", {
  expect_error(install_privatekeras(python = "/nonexistent/python3"),
               "needs Python >= 3.10.*/nonexistent/python3: does not exist.*python3-venv")
  # Found without naming a path: a Python >= 3.10 with venv (this machine has one).
  py <- privatekeras:::find_python()
  expect_true(file.exists(py))
  expect_gte(utils::compareVersion(attr(py, "version"), "3.10"), 0)
  # A Python that is too old is refused with its version (a fake interpreter that reports
  # 3.9.2, as an old Python would).
  old <- file.path(tempdir(), "python3.9")
  writeLines(c("#!/bin/sh", "echo 3.9.2 True"), old)
  Sys.chmod(old, "0755")
  expect_error(privatekeras:::find_python(old), "Python 3.9.2, too old")
  noenv <- file.path(tempdir(), "python-novenv")
  writeLines(c("#!/bin/sh", "echo 3.11.2 False"), noenv)
  Sys.chmod(noenv, "0755")
  expect_error(privatekeras:::find_python(noenv), "without the venv module.*python3-venv")
})

test_that("missing system libraries are named with the package to install", {
  # This machine has them (make setup installs them): nothing is missing.
  expect_length(privatekeras:::system_missing(), 0L)
  expect_silent(privatekeras:::check_system("all"))
  # Without pkg-config or libsodium on the PATH / in pkg-config's path: named, with the
  # Debian packages.
  old <- Sys.getenv(c("PKG_CONFIG_PATH", "PKG_CONFIG_LIBDIR"), unset = NA)
  on.exit(for (v in names(old)) {
    if (is.na(old[[v]])) Sys.unsetenv(v) else do.call(Sys.setenv, as.list(old[v]))
  }, add = TRUE)
  Sys.setenv(PKG_CONFIG_LIBDIR = tempfile(), PKG_CONFIG_PATH = "")
  missing <- privatekeras:::system_missing()
  expect_equal(unname(missing), "libsodium-dev")
  expect_error(privatekeras:::check_system("all"),
               "libsodium not found by pkg-config.*sudo apt-get install libsodium-dev")
  expect_silent(privatekeras:::check_system("client"))  # a client builds nothing
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
