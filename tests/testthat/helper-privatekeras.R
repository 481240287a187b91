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
    images <- f$test$x[1:10, , , , drop = FALSE]
    cache <<- list(path = path, path_any = path_any, model = model, images = images, labels = f$test$y[1:10],
                   logits = trainer$predict(images, verbose = 0L))
    cache
  }
})

# Private logits agree with plaintext Keras: argmax on every row, and within the
# stated tolerance (ABY3 with 16 fractional bits; typical errors ~0.005).
expect_private_matches <- function(private, plain, atol = 0.05) {
  expect_equal(dim(private), dim(plain))
  expect_equal(max.col(private), max.col(plain))
  expect_lt(max(abs(private - plain)), atol)
}

worker_count <- function() {
  cmd <- vapply(list.files("/proc", pattern = "^[0-9]+$", full.names = TRUE), function(d) {
    x <- tryCatch(readBin(file.path(d, "cmdline"), "raw", 4096), error = function(e) raw())
    rawToChar(x[x != as.raw(0)])
  }, character(1))
  sum(grepl("privatekeras.worker", cmd, fixed = TRUE))
}
