# A binary classifier built and trained in R (through reticulate, as keras3 does),
# with a residual branch, shared with a declared input range and served by this
# session; a client in another R process gets the same probabilities and classes as
# Keras's predict(). Also: a model that could leave the fixed-point headroom is refused.

binary_classifier <- function() {
  keras <- reticulate::import("keras")
  np <- reticulate::import("numpy", convert = FALSE)
  keras$utils$set_random_seed(21L)
  L <- keras$layers
  set.seed(21)
  n <- 300L
  x <- cbind(rnorm(n, 40, 10), rnorm(n, 5, 2), rnorm(n, 100, 30), runif(n))
  y <- as.integer((x[, 1] - 40) / 10 + (x[, 3] - 100) / 30 - (x[, 2] - 5) / 2 > 0)
  norm <- L$Normalization()
  norm$adapt(np$array(x))
  inp <- keras$Input(shape = list(4L))
  h <- L$Dense(8L, activation = "relu")(norm(inp))
  h <- L$Add()(list(h, L$Dense(8L)(h)))               # a residual join
  out <- L$Dense(1L, activation = "sigmoid")(L$LeakyReLU()(h))
  model <- keras$Model(inp, out)
  model$compile(optimizer = "adam", loss = "binary_crossentropy")
  model$fit(x, matrix(y), epochs = 40L, batch_size = 32L, verbose = 0L)
  list(model = model, x = x[1:12, , drop = FALSE],
       plain = model$predict(x[1:12, , drop = FALSE], verbose = 0L))
}

test_that("a binary classifier built in R answers like predict(), end to end", {
  skip_if_no_privatekeras()
  skip_if_not_installed("callr")
  m <- binary_classifier()
  hosts <- free_hosts()
  cl <- pk_cluster(hosts)
  pk_start(cl)
  on.exit(pk_stop(cl), add = TRUE)
  sm <- share(m$model, cl, batch_size = 4, input_range = c(-50, 300))
  expect_output(print(sm), "sigmoid applied by the client")

  client <- callr::r_bg(function(hosts, x) {
    library(privatekeras)
    client <- connect(pk_cluster(hosts, auto_managed = FALSE), c(4, 4), c(4, 1),
                      timeout = 120)
    p <- query(client, x, activation = TRUE)
    logit <- query(client, x)
    bad <- tryCatch(query(client, x * 10), error = function(e) e)
    list(p = p, logit = logit, bad = conditionMessage(bad), bad_class = class(bad))
  }, args = list(hosts = hosts, x = m$x))
  n <- tryCatch(serve(sm, num_requests = 6, idle_timeout = 180), error = function(e) e)
  client$wait(60000)
  if (inherits(n, "error")) {
    stop("serve: ", conditionMessage(n), "\n--- client:\n",
         paste(client$read_all_error_lines(), collapse = "\n"), call. = FALSE)
  }
  res <- client$get_result()
  expect_equal(n, 6L)  # 12 rows in batches of 4, twice; the out-of-range query sent nothing
  expect_equal(dim(res$p), c(12L, 1L))
  expect_lt(max(abs(res$p - m$plain)), 1e-3)
  expect_equal(res$p > 0.5, m$plain > 0.5)
  expect_lt(max(abs(res$logit - qlogis(m$plain))), 0.05)
  expect_match(res$bad, "outside the range the model owner declared")
  expect_true("privatekeras_InputError" %in% res$bad_class)
})

test_that("a model that could leave the fixed-point headroom is refused at share()", {
  skip_if_no_privatekeras()
  keras <- reticulate::import("keras")
  model <- keras$Sequential(list(keras$Input(shape = list(600L)),
                                 keras$layers$Dense(1L, name = "wide")))
  model$layers[[1]]$set_weights(list(matrix(1000, 600, 1), array(0, 1)))
  cl <- pk_cluster(free_hosts())   # never started: the refusal comes first
  err <- tryCatch(share(model, cl), error = function(e) e)
  expect_true("privatekeras_OutOfRangeError" %in% class(err))
  expect_match(conditionMessage(err), "layer 'wide' \\(dense\\) can reach values")
  expect_match(conditionMessage(err), "input_range")
})
