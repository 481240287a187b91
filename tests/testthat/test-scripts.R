# The tutorial's two-process flow as two Rscript processes: the native API and
# the Syft-compatible facade.

run_pair <- function(serve_args, client_args) {
  rscript <- file.path(R.home("bin"), "Rscript")
  owner <- processx::process$new(rscript, serve_args, stdout = "|", stderr = "2>&1")
  client <- processx::run(rscript, client_args, error_on_status = FALSE, timeout = 300,
                          stderr_to_stdout = TRUE)
  owner$wait(120000)
  if (owner$is_alive()) owner$kill()
  list(owner_status = owner$get_exit_status(), owner_out = owner$read_all_output(),
       client_status = client$status, client_out = client$stdout)
}

actual_predicted <- function(out) grep("^Actual: ", strsplit(out, "\n")[[1]], value = TRUE)

test_that("one Rscript serves 3 queries, another queries 3 images", {
  skip_if_no_privatekeras()
  skip_if_not_installed("processx")
  m <- tutorial_model()
  hosts <- paste(free_hosts(), collapse = ",")
  ex <- system.file("examples", package = "privatekeras")
  r <- run_pair(c(file.path(ex, "serve.R"), m$path, hosts, "3"),
                c(file.path(ex, "client.R"), hosts, "3"))
  expect_equal(r$client_status, 0, info = r$client_out)
  expect_equal(r$owner_status, 0, info = r$owner_out)
  expect_equal(actual_predicted(r$client_out),
               sprintf("Actual: %d, predicted: %d", m$labels[1:3], max.col(m$logits)[1:3] - 1L))
})

test_that("the Syft tutorial's R scripts run with only the import line changed", {
  skip_if_no_privatekeras()
  skip_if_not_installed("processx")
  m <- tutorial_model()
  weights <- tempfile(fileext = ".weights.h5")
  m$model$save_weights(weights)
  hosts <- paste(free_hosts(), collapse = ",")
  ex <- system.file("examples", package = "privatekeras")
  r <- run_pair(c(file.path(ex, "syft_serve.R"), weights, hosts),
                c(file.path(ex, "syft_client.R"), hosts))
  expect_equal(r$client_status, 0, info = r$client_out)
  expect_equal(r$owner_status, 0, info = r$owner_out)
  expect_equal(actual_predicted(r$client_out),
               sprintf("Actual: %d, predicted: %d", m$labels[1:3], max.col(m$logits)[1:3] - 1L))
})
