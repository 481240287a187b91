# No exported name of privatekeras masks an export of the packages R users of Keras load next
# to it. Compared with the installed namespaces where a package is installed, and always with
# the recorded export lists in exports/ (each file says which release and commit it lists).

NEIGHBOURS <- c("keras3", "keras", "tensorflow", "reticulate")

recorded_exports <- function(pkg) {
  path <- test_path("exports", paste0(pkg, ".txt"))
  lines <- readLines(path, warn = FALSE)
  lines[nzchar(lines) & !startsWith(lines, "#")]
}

test_that("the recorded export lists are there and plausible", {
  for (pkg in NEIGHBOURS) {
    header <- readLines(test_path("exports", paste0(pkg, ".txt")), n = 3L)
    expect_match(header[[1]], paste0("'", pkg, "' [0-9.]+"), info = pkg)
    expect_match(paste(header, collapse = " "), "commit [0-9a-f]{40}", info = pkg)
  }
  expect_true("predict_proba" %in% recorded_exports("keras"))
  expect_true("install_keras" %in% recorded_exports("keras3"))
  expect_true("import" %in% recorded_exports("reticulate"))
  expect_true("install_tensorflow" %in% recorded_exports("tensorflow"))
  expect_gt(length(recorded_exports("keras3")), 500L)
})

test_that("no export masks one of keras3, keras, tensorflow or reticulate (recorded lists)", {
  ours <- getNamespaceExports("privatekeras")
  expect_true(all(c("query", "share", "connect", "pk_cluster") %in% ours))
  for (pkg in NEIGHBOURS) {
    clash <- intersect(ours, recorded_exports(pkg))
    expect_equal(clash, character(), info = paste("masks exports of", pkg))
  }
})

test_that("no export masks one of the installed neighbours' namespaces", {
  installed <- NEIGHBOURS[vapply(NEIGHBOURS, requireNamespace, logical(1), quietly = TRUE)]
  # reticulate is always installed (privatekeras imports it); the others are not on Debian.
  expect_true("reticulate" %in% installed)
  ours <- getNamespaceExports("privatekeras")
  for (pkg in installed) {
    clash <- intersect(ours, getNamespaceExports(pkg))
    expect_equal(clash, character(), info = paste("masks exports of", pkg,
                                                  as.character(utils::packageVersion(pkg))))
  }
})

test_that("the rule catches a clash", {
  # The check above would fail for the name privatekeras used to export.
  expect_true("predict_proba" %in% intersect(c("query", "predict_proba"),
                                             recorded_exports("keras")))
  expect_false(exists("predict_proba", envir = asNamespace("privatekeras"), inherits = FALSE))
})
