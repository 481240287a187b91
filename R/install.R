#' Install the Python side of privatekeras
#'
#' Creates a Python virtualenv (from Debian's `/usr/bin/python3` when present,
#' which avoids loading the wrong libpython when R starts Python), installs the
#' pinned stack (TensorFlow 2.20 with Keras 3, TF Encrypted 0.9.1 without its
#' broken pins) and compiles privatekeras' secure kernels (ChaCha20 CSPRNG and
#' ABY3 bit ops) against that TensorFlow. Safe to re-run: only what is missing
#' is done. Needs `g++` and `libsodium-dev` (Debian:
#' `apt-get install python3-venv g++ libsodium-dev`).
#'
#' @param envname Name of the virtualenv (default `"r-privatekeras"`), or a path.
#' @param python The Python used to create the virtualenv.
#' @param force Recreate the virtualenv from scratch.
#' @return The path of the environment's Python, invisibly.
#' @examples
#' \dontrun{
#' install_privatekeras()
#' }
#' @export
install_privatekeras <- function(envname = "r-privatekeras", python = NULL, force = FALSE) {
  stopifnot(is.character(envname), length(envname) == 1L, nzchar(envname))
  if (is.null(python)) {
    python <- if (file.exists("/usr/bin/python3")) "/usr/bin/python3" else Sys.which("python3")
  }
  if (!nzchar(python) || !file.exists(python)) {
    stop("no Python 3 found: install it (Debian: apt-get install python3 python3-venv)",
         call. = FALSE)
  }
  if (!file.exists("/usr/include/sodium.h")) {
    warning("libsodium headers not found; the secure kernels will not build. ",
            "Install them first (Debian: apt-get install g++ libsodium-dev).", call. = FALSE)
  }
  if (force && reticulate::virtualenv_exists(envname)) {
    reticulate::virtualenv_remove(envname, confirm = FALSE)
  }
  if (!reticulate::virtualenv_exists(envname)) {
    message("privatekeras: creating virtualenv '", envname, "' from ", python)
    reticulate::virtualenv_create(envname, python = python)
  }
  py <- reticulate::virtualenv_python(envname)
  pydir <- system.file("python", package = "privatekeras")
  run <- function(args, what, env = character()) {
    message("privatekeras: ", what)
    status <- system2(py, args, env = env)
    if (!identical(status, 0L)) stop("privatekeras: failed while ", what, call. = FALSE)
  }
  run(c("-m", "pip", "install", "-q", "-r", shQuote(file.path(pydir, "requirements.txt"))),
      "installing the pinned Python stack (TensorFlow, Keras, ...): a few minutes")
  run(c("-m", "pip", "install", "-q", "--no-deps", "-r",
        shQuote(file.path(pydir, "requirements-nodeps.txt"))),
      "installing TF Encrypted 0.9.1 (without its broken pins)")
  run(c("-m", "privatekeras.kernels", "build"),
      "building the secure kernels for this TensorFlow",
      env = paste0("PYTHONPATH=", shQuote(pydir)))
  message("privatekeras: done. Restart R, then library(privatekeras).")
  invisible(py)
}
