# Helpers for tests that run against real workers (after rstudio/tensorflow's
# tests/testthat/helper-utils.R): skip cleanly where the Python side is absent.

skip_if_no_privatekeras <- function() {
  ok <- tryCatch({
    privatekeras::pk_python()
    TRUE
  }, error = function(e) FALSE)
  if (!ok) skip("privatekeras' Python environment is not available")
}

port_free <- function(port) {
  tryCatch({
    s <- serverSocket(port)
    close(s)
    TRUE
  }, error = function(e) FALSE)
}

free_hosts <- function() {
  repeat {
    base <- sample(seq(41000L, 59000L, by = 3L), 1L)
    ports <- base + 0:2
    if (all(vapply(ports, port_free, logical(1)))) return(paste0("localhost:", ports))
  }
}

# The tutorial CNN, trained briefly on Fashion-MNIST through reticulate; cached
# per test run. Returns the model file and plaintext logits of the first images.
tutorial_model <- local({
  cache <- NULL
  function() {
    if (!is.null(cache)) return(cache)
    keras <- reticulate::import("keras")
    keras$utils$set_random_seed(7L)
    f <- privatekeras::pk_fashion_mnist()
    L <- keras$layers
    model <- keras$Sequential(list(
      keras$Input(shape = c(28L, 28L, 1L), batch_size = 1L),
      L$Conv2D(16L, 3L, padding = "same"), L$AveragePooling2D(2L), L$ReLU(),
      L$Conv2D(32L, 3L, padding = "same"), L$AveragePooling2D(2L), L$ReLU(),
      L$Conv2D(64L, 3L, padding = "same"), L$AveragePooling2D(2L), L$ReLU(),
      L$Flatten(), L$Dense(10L)
    ))
    trainer <- keras$Sequential(c(list(keras$Input(shape = c(28L, 28L, 1L))), model$layers))
    trainer$compile(optimizer = "adam",
                    loss = keras$losses$SparseCategoricalCrossentropy(from_logits = TRUE))
    idx <- 1:6000
    trainer$fit(f$train$x[idx, , , , drop = FALSE], array(f$train$y[idx]), epochs = 1L,
                batch_size = 64L, verbose = 0L)
    path <- tempfile(fileext = ".keras")
    model$save(path)
    path_any <- tempfile(fileext = ".keras")  # the same weights, no fixed batch size
    trainer$save(path_any)
    # The same weights with a final softmax: clients apply it (query(activation = TRUE)).
    with_softmax <- keras$Sequential(c(list(keras$Input(shape = c(28L, 28L, 1L), batch_size = 1L)),
                                       model$layers, list(L$Activation("softmax"))))
    path_softmax <- tempfile(fileext = ".keras")
    with_softmax$save(path_softmax)
    images <- f$test$x[1:10, , , , drop = FALSE]
    cache <<- list(path = path, path_any = path_any, path_softmax = path_softmax, model = model,
                   images = images,
                   labels = f$test$y[1:10],
                   logits = trainer$predict(images, verbose = 0L))
    cache
  }
})

softmax_rows <- function(logits) {
  e <- exp(logits - apply(logits, 1, max))
  e / rowSums(e)
}

# Private logits agree with plaintext Keras: argmax on every row, and within the
# stated tolerance (ABY3 with 16 fractional bits; typical errors ~0.005).
expect_private_matches <- function(private, plain, atol = 0.05) {
  expect_equal(dim(private), dim(plain))
  expect_equal(max.col(private), max.col(plain))
  expect_lt(max(abs(private - plain)), atol)
}

# Worker processes (`python -m privatekeras worker ...`, or the `privatekeras worker`
# script): their cmdlines, with the NUL separators made spaces, hold "privatekeras worker".
# Only children of `parent` (by default this R process, which spawns them through
# Cluster.start()), so that other test runs on the machine do not count.
worker_count <- function(parent = Sys.getpid()) {
  dirs <- list.files("/proc", pattern = "^[0-9]+$", full.names = TRUE)
  is_worker <- vapply(dirs, function(d) {
    x <- tryCatch(readBin(file.path(d, "cmdline"), "raw", 4096), error = function(e) raw())
    x[x == as.raw(0)] <- as.raw(32)
    if (!grepl("privatekeras worker ", rawToChar(x), fixed = TRUE)) return(FALSE)
    if (is.null(parent)) return(TRUE)
    status <- tryCatch(readLines(file.path(d, "status"), warn = FALSE),
                       error = function(e) character())
    ppid <- sub("^PPid:[[:space:]]*", "", grep("^PPid:", status, value = TRUE))
    identical(ppid, as.character(parent))
  }, logical(1))
  sum(is_worker)
}

# Python packages the client side must not load (a client is numpy + grpcio).
HEAVY_MODULES <- c("tensorflow", "keras", "tf_encrypted", "tf2onnx", "onnx", "h5py")

# This process's environment for a child process, with `...` set (NULL removes a variable).
child_env <- function(...) {
  env <- as.list(Sys.getenv())
  set <- list(...)
  for (name in names(set)) env[[name]] <- set[[name]]
  unlist(env)
}

# The end of each worker's log (auto-managed workers of a started cluster), for failures.
cluster_logs <- function(cluster, lines = 15L) {
  dir <- tryCatch(cluster$py$`_logdir`, error = function(e) NULL)
  if (is.null(dir) || !dir.exists(dir)) return("(no worker logs)")
  logs <- vapply(sort(list.files(dir, full.names = TRUE)), function(f) {
    noise <- paste0("^I0000|^WARNING: All log|^ *[{}]? *$|",
                    "^ *(key|value|device_count|gpu_options|experimental|allow_soft|pluggable)")
    keep <- grep(noise, readLines(f, warn = FALSE), value = TRUE, invert = TRUE)
    paste0("--- ", basename(f), ":\n", paste(utils::tail(keep, lines), collapse = "\n"))
  }, "")
  paste(logs, collapse = "\n")
}
