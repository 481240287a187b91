# The CKKS backend from R, with real processes: a model owner in a background R
# process (pk_server(), pk_start(), share(fit), serve()) and a client here
# (connect(), query() with a data frame). The decrypted linear predictor must
# equal predict(fit) within 1e-3 and the classes must agree on every row.

ckks_flow <- function(fit, newdata, num_requests, input_range = NULL) {
  host <- free_hosts()[[1]]
  owner <- callr::r_bg(function(fit, host, num_requests, input_range) {
    library(privatekeras)
    srv <- pk_server(host)
    pk_start(srv)
    on.exit(pk_stop(srv))
    sm <- share(fit, srv, input_range = input_range)
    print(sm)
    serve(sm, num_requests = num_requests)
  }, args = list(fit = fit, host = host, num_requests = num_requests,
                 input_range = input_range), stdout = "|", stderr = "2>&1")
  client <- connect(pk_server(host, auto_managed = FALSE), timeout = 120)
  on.exit({
    disconnect(client)
    owner$wait(30)
    if (owner$is_alive()) owner$kill()
  })
  eta <- query(client, newdata)
  p <- query(client, newdata, activation = TRUE)
  printed <- capture.output(print(client))
  owner$wait(60)
  list(eta = eta, p = p, printed = printed, owner = owner$read_all_output_lines())
}

test_that("an R glm (binomial) served on CKKS equals predict() on every iris row", {
  skip_if_no_privatekeras()
  skip_if_not_installed("callr")
  fit <- suppressWarnings(glm(I(Species == "virginica") ~ Sepal.Length + Sepal.Width +
                                Petal.Length + Petal.Width, family = binomial, data = iris))
  res <- ckks_flow(fit, iris, num_requests = 2)
  eta <- predict(fit, newdata = iris)
  p <- predict(fit, newdata = iris, type = "response")
  expect_equal(dim(res$eta), c(150L, 1L))
  expect_lt(max(abs(res$eta[, 1] - eta)), 1e-3)
  expect_equal(res$p[, 1] > 0.5, unname(p > 0.5))
  expect_lt(max(abs(res$p[, 1] - p)), 1e-4)
  expect_true(any(grepl("IN CLEAR", res$owner)))
  expect_true(any(grepl("CKKS N=", res$owner)))
  expect_match(paste(res$printed, collapse = "\n"), "keys made and kept in this R session")
})

test_that("an R lm with a factor and a transformed term, queried with a data frame", {
  skip_if_no_privatekeras()
  skip_if_not_installed("callr")
  fit <- lm(Sepal.Length ~ Species + log(Petal.Length) + I(Petal.Width^2), data = iris)
  newdata <- iris[c(1, 51, 101, 150), c("Petal.Width", "Species", "Petal.Length")]
  res <- ckks_flow(fit, newdata, num_requests = 2, input_range = c(-10, 10))
  expect_lt(max(abs(res$eta[, 1] - predict(fit, newdata))), 1e-3)
  expect_lt(max(abs(res$p[, 1] - predict(fit, newdata))), 1e-3)
})

test_that("a probit glm and bad inputs", {
  skip_if_no_privatekeras()
  skip_if_not_installed("callr")
  fit <- suppressWarnings(glm(am ~ wt + hp, family = binomial(link = "probit"), data = mtcars))
  host <- free_hosts()[[1]]
  owner <- callr::r_bg(function(fit, host) {
    library(privatekeras)
    srv <- pk_server(host)
    pk_start(srv)
    on.exit(pk_stop(srv))
    serve(share(fit, srv), num_requests = 1)
  }, args = list(fit = fit, host = host))
  client <- connect(pk_server(host, auto_managed = FALSE), timeout = 120)
  on.exit({
    owner$wait(30)
    if (owner$is_alive()) owner$kill()
  })
  expect_error(query(client, mtcars[1:3, c("wt", "mpg")]), "hp")
  expect_error(query(client, matrix(1, 2, 3)), "2 features per row")
  bad <- mtcars[1:3, ]
  bad$wt[2] <- NA
  expect_error(query(client, bad), "NA")
  expect_error(query(client, "x"), "data frame or a numeric matrix")
  p <- query(client, mtcars, activation = TRUE)
  expect_lt(max(abs(p[, 1] - predict(fit, mtcars, type = "response"))), 1e-4)
  disconnect(client)
})

test_that("a formula that calls anything else is refused on the client", {
  expect_error(privatekeras:::ckks_check_expr(quote(~ x + system("echo hi"))),
               "calls system")
  expect_silent(privatekeras:::ckks_check_expr(quote(~ log(x) + I(y^2) + poly(z, 2))))
})

test_that("pk_server() checks its arguments in R", {
  expect_error(pk_server("nope"), "host:port")
  expect_error(pk_server("localhost:4100", scheme = "aby3"), "ckks")
})
