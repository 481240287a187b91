# The R user's install paths, for real: a full environment (the pinned stack and the
# compiled secure kernels), a client environment (numpy, grpcio, protobuf; no TensorFlow)
# that gets correct private answers, and the message when no environment exists.

test_that("a missing Python environment names install_privatekeras()", {
  skip_if_not_installed("processx")
  skip_if_not(file.exists("/usr/bin/python3"))
  rscript <- file.path(R.home("bin"), "Rscript")
  env <- child_env(RETICULATE_PYTHON = "/usr/bin/python3", WORKON_HOME = tempfile())
  res <- processx::run(rscript, c("-e", "library(privatekeras); pk_cluster()"),
                       env = env, error_on_status = FALSE, stderr_to_stdout = TRUE)
  expect_false(res$status == 0)
  expect_match(res$stdout, "install_privatekeras\\(\\)")
})

test_that("the client's pins are read from requirements.txt", {
  req <- system.file("python", "requirements.txt", package = "privatekeras")
  pins <- privatekeras:::client_pins(req)
  lines <- readLines(req)
  expect_equal(sub("==.*", "", pins), c("numpy", "grpcio", "protobuf", "tenseal"))
  expect_true(all(pins %in% lines))
  partial <- tempfile()
  writeLines(grep("^protobuf==", lines, value = TRUE, invert = TRUE), partial)
  expect_error(privatekeras:::client_pins(partial), "must pin protobuf")
  expect_error(install_privatekeras(tempfile(), role = "worker"), "should be one of")
})

test_that("install_privatekeras() builds a working environment", {
  skip_if_not(identical(Sys.getenv("PRIVATEKERAS_TEST_INSTALL"), "true"),
              "set PRIVATEKERAS_TEST_INSTALL=true to run the full install (make test does)")
  envdir <- file.path(tempdir(), "pk-install-test")
  on.exit(unlink(envdir, recursive = TRUE), add = TRUE)
  msgs <- character()
  py <- withCallingHandlers(install_privatekeras(envname = envdir),
                            message = function(e) msgs <<- c(msgs, conditionMessage(e)))
  said <- paste(msgs, collapse = "")
  expect_true(file.exists(py))
  # It says what it installed and where: the environment, the versions, the kernels.
  expect_match(said, paste0("Full environment .* in ", envdir))
  expect_match(said, "installed: tensorflow-cpu 2\\.20\\.0, keras [0-9.]+, tf-encrypted 0\\.9\\.1")
  expect_match(said, "secure kernels: /[^ ]*pk_ops\\.so")
  expect_match(said, paste0("Python: ", py), fixed = TRUE)
  # Safe to re-run.
  expect_message(install_privatekeras(envname = envdir), "done")
  check <- paste(
    "import tensorflow",
    "from privatekeras.kernels import find_library",
    "from privatekeras.mpc.tfe_compat import import_tfe",
    "import_tfe(); assert find_library(); print('OK', tensorflow.__version__)", sep = "\n")
  out <- system2(py, c("-c", shQuote(check)), stdout = TRUE, stderr = TRUE,
                 env = paste0("PYTHONPATH=", system.file("python", package = "privatekeras")))
  expect_true(any(grepl("^OK 2\\.20\\.0$", out)), info = paste(out, collapse = "\n"))
})

# The R client run in the client environment: connect, three private queries and one
# query(activation = TRUE); it saves what it got and which Python modules it loaded.
CLIENT_ENV_SCRIPT <- '
args <- commandArgs(trailingOnly = TRUE)
library(privatekeras)
images <- readRDS(args[[2]])
cl <- pk_cluster(strsplit(args[[1]], ",")[[1]], auto_managed = FALSE)
client <- connect(cl, c(1, 28, 28, 1), c(1, 10), timeout = 300)
q <- query(client, images[1:3, , , , drop = FALSE])
p <- query(client, images[4, , , , drop = FALSE], activation = TRUE)
disconnect(client)
reticulate::py_run_string(
  "import sys; pk_modules = sorted({m.split(\'.\')[0] for m in sys.modules})")
saveRDS(list(q = q, p = p, prefix = reticulate::import("sys")$prefix,
             modules = unlist(reticulate::py$pk_modules)), args[[3]])
'

test_that("install_privatekeras(role = 'client') makes a small environment that queries", {
  skip_if_not(identical(Sys.getenv("PRIVATEKERAS_TEST_INSTALL"), "true"),
              "set PRIVATEKERAS_TEST_INSTALL=true to run the install tests (make test does)")
  skip_if_no_privatekeras()
  skip_if_not_installed("callr")
  skip_if_not_installed("processx")
  m <- tutorial_model()
  hosts <- free_hosts()
  # The model owner, in the full environment, starts the workers and serves 4 queries;
  # it gets ready while the client environment is installed.
  owner_log <- tempfile(fileext = ".log")
  owner <- callr::r_bg(function(hosts, path) {
    library(privatekeras)
    cl <- pk_cluster(hosts)
    pk_start(cl)
    on.exit(pk_stop(cl))
    sm <- share(path, cl, input_range = c(0, 1))
    serve(sm, num_requests = 4, idle_timeout = 300)
  }, args = list(hosts = hosts, path = m$path_softmax), supervise = TRUE, stdout = owner_log,
  stderr = "2>&1")
  on.exit(if (owner$is_alive()) owner$kill(), add = TRUE)

  envdir <- file.path(tempdir(), "pk-client-env")
  on.exit(unlink(envdir, recursive = TRUE), add = TRUE)
  pins <- privatekeras:::client_pins(system.file("python", "requirements.txt",
                                                 package = "privatekeras"))
  t0 <- Sys.time()
  msgs <- character()
  py <- withCallingHandlers(
    install_privatekeras(envname = envdir, role = "client"),
    message = function(e) msgs <<- c(msgs, conditionMessage(e)))
  took <- as.numeric(difftime(Sys.time(), t0, units = "secs"))
  said <- paste(msgs, collapse = "")
  expect_match(said, paste0("installed: ", paste(sub("==", " ", pins), collapse = ", ")),
               fixed = TRUE)
  expect_match(said, envdir, fixed = TRUE)
  expect_lt(took, 180)  # ~25 s here; it builds nothing
  expect_equal(normalizePath(dirname(dirname(py))), normalizePath(envdir))

  # No TensorFlow (nor the rest of the full stack) in it.
  tf <- suppressWarnings(system2(py, c("-c", shQuote("import tensorflow")), stdout = TRUE,
                                 stderr = TRUE))
  expect_false(is.null(attr(tf, "status")))
  expect_match(paste(tf, collapse = "\n"), "No module named 'tensorflow'")
  listed <- system2(py, c("-m", "pip", "list", "--format=freeze",
                          "--disable-pip-version-check"), stdout = TRUE, stderr = FALSE)
  have <- tolower(sub("==.*", "", listed))
  expect_true(all(c("numpy", "grpcio", "protobuf") %in% have))
  expect_false(any(c("tensorflow", "tensorflow-cpu", "keras", "tf-encrypted", "cryptography")
                   %in% have), info = paste(listed, collapse = ", "))

  # An R client in that environment gets the same answers as plaintext Keras.
  script <- tempfile(fileext = ".R")
  writeLines(CLIENT_ENV_SCRIPT, script)
  images <- tempfile(fileext = ".rds")
  saveRDS(m$images[1:4, , , , drop = FALSE], images)
  result <- tempfile(fileext = ".rds")
  env <- child_env(RETICULATE_PYTHON = py, PYTHONPATH = NULL, PYTHONHOME = NULL,
                   VIRTUAL_ENV = NULL)
  client_log <- tempfile(fileext = ".log")
  client <- processx::process$new(file.path(R.home("bin"), "Rscript"),
                                  c(script, paste(hosts, collapse = ","), images, result),
                                  env = env, stdout = client_log, stderr = "2>&1",
                                  supervise = TRUE)
  on.exit(if (client$is_alive()) client$kill(), add = TRUE)
  # Serving ends only after the client collected its answers: once the owner is gone, the
  # client has nothing to wait for (if the owner failed, it would wait out its timeout).
  deadline <- Sys.time() + 400
  while (client$is_alive() && Sys.time() < deadline) {
    if (!owner$is_alive()) deadline <- min(deadline, Sys.time() + 30)
    Sys.sleep(0.5)
  }
  if (client$is_alive()) client$kill()
  client$wait(10000)
  client_said <- paste(readLines(client_log, warn = FALSE), collapse = "\n")
  owner$wait(120000)
  owner_said <- paste(readLines(owner_log, warn = FALSE), collapse = "\n")
  expect_equal(client$get_exit_status(), 0,
               info = paste(client_said, owner_said, sep = "\n--- owner:\n"))
  expect_equal(owner$get_result(), 4L)
  got <- readRDS(result)
  expect_equal(normalizePath(got$prefix), normalizePath(envdir))
  expect_false(any(HEAVY_MODULES %in% got$modules), info = paste(got$modules, collapse = " "))
  expect_true(all(c("numpy", "grpc", "privatekeras") %in% got$modules))
  expect_private_matches(got$q, m$logits[1:3, , drop = FALSE])
  expect_lt(max(abs(got$p - softmax_rows(m$logits[4, , drop = FALSE]))), 0.01)
})
