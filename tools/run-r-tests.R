# Runs the testthat suite against the installed package and ends with one plain
# line, `R: N passed, N failed, N skipped`, which CI reads. Exit status 1 on failure.
suppressPackageStartupMessages(library(testthat))
library(privatekeras)
res <- as.data.frame(test_dir("tests/testthat", package = "privatekeras",
                              load_package = "installed", reporter = "progress",
                              stop_on_failure = FALSE))
failed <- sum(res$failed) + sum(res$error)
skipped <- sum(res$skipped)
passed <- sum(res$nb) - sum(res$failed) - sum(res$skipped)
cat(sprintf("R: %d passed, %d failed, %d skipped\n", passed, failed, skipped))
quit(status = if (failed > 0) 1L else 0L)
