# The R user's install path, for real: a fresh virtualenv with the pinned stack
# and the compiled secure kernels; and the message when no environment exists.

test_that("a missing Python environment names install_privatekeras()", {
  skip_if_not_installed("processx")
  skip_if_not(file.exists("/usr/bin/python3"))
  rscript <- file.path(R.home("bin"), "Rscript")
  env <- c(Sys.getenv(), RETICULATE_PYTHON = "/usr/bin/python3", WORKON_HOME = tempfile())
  res <- processx::run(rscript, c("-e", "library(privatekeras); pk_cluster()"),
                       env = env, error_on_status = FALSE, stderr_to_stdout = TRUE)
  expect_false(res$status == 0)
  expect_match(res$stdout, "install_privatekeras\\(\\)")
})

test_that("install_privatekeras() builds a working environment", {
  skip_if_not(identical(Sys.getenv("PRIVATEKERAS_TEST_INSTALL"), "true"),
              "set PRIVATEKERAS_TEST_INSTALL=true to run the full install (make test does)")
  envdir <- file.path(tempdir(), "pk-install-test")
  on.exit(unlink(envdir, recursive = TRUE), add = TRUE)
  expect_message(py <- install_privatekeras(envname = envdir), "secure kernels")
  expect_true(file.exists(py))
  # Safe to re-run.
  expect_message(install_privatekeras(envname = envdir), "done")
  check <- paste(
    "import tensorflow",
    "from privatekeras.kernels import find_library",
    "from privatekeras.tfe_compat import import_tfe",
    "import_tfe(); assert find_library(); print('OK', tensorflow.__version__)", sep = "\n")
  out <- system2(py, c("-c", shQuote(check)), stdout = TRUE, stderr = TRUE,
                 env = paste0("PYTHONPATH=", system.file("python", package = "privatekeras")))
  expect_true(any(grepl("^OK 2\\.20\\.0$", out)), info = paste(out, collapse = "\n"))
})
