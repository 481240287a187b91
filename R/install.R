#' Install the Python side of privatekeras
#'
#' Creates a Python virtualenv (from Debian's `/usr/bin/python3` when present,
#' which avoids loading the wrong libpython when R starts Python) and installs
#' what this machine's role needs, pinned to the versions in the package's
#' `python/requirements.txt`. Safe to re-run: only what is missing is done.
#'
#' * `role = "all"` (the default): everything, for the model owner and for
#'   workers started here by [pk_start()]: the pinned stack (TensorFlow 2.20
#'   with Keras 3, TF Encrypted 0.9.1 without its broken pins), and
#'   privatekeras' secure kernels (ChaCha20 CSPRNG and ABY3 bit operations),
#'   compiled against that TensorFlow. Takes a few minutes; needs `g++` and
#'   `libsodium-dev` (Debian: `apt-get install python3-venv g++ libsodium-dev`).
#' * `role = "client"`: what a client needs to [connect()], [query()] and
#'   [predict_proba()], and nothing more: `numpy`, `grpcio` and `protobuf`.
#'   No TensorFlow (a client never computes with it), no kernels to build; it
#'   takes well under a minute. Such an environment cannot [share()] a model or
#'   [pk_start()] workers.
#'
#' At the end it prints the environment's path and what it installed. The
#' default environment name, `"r-privatekeras"`, is found by `library(privatekeras)`
#' on its own; for another name or a path, set `RETICULATE_PYTHON` to the
#' returned Python before loading the package.
#'
#' @param envname Name of the virtualenv (default `"r-privatekeras"`), or a path.
#' @param python The Python used to create the virtualenv.
#' @param force Recreate the virtualenv from scratch.
#' @param role `"all"` (owner and workers) or `"client"` (queries only).
#' @return The path of the environment's Python, invisibly.
#' @examples
#' \dontrun{
#' # On the model owner's machine (and where pk_start() runs the workers):
#' install_privatekeras()
#'
#' # On a machine that only queries a served model: numpy, grpcio, protobuf.
#' install_privatekeras(role = "client")
#' # then, in a new R session:
#' library(privatekeras)
#' client <- connect(pk_cluster(auto_managed = FALSE), c(1, 28, 28, 1), c(1, 10))
#' }
#' @export
install_privatekeras <- function(envname = "r-privatekeras", python = NULL, force = FALSE,
                                 role = c("all", "client")) {
  stopifnot(is.character(envname), length(envname) == 1L, nzchar(envname))
  role <- match.arg(role)
  if (is.null(python)) {
    python <- if (file.exists("/usr/bin/python3")) "/usr/bin/python3" else Sys.which("python3")
  }
  if (!nzchar(python) || !file.exists(python)) {
    stop("no Python 3 found: install it (Debian: apt-get install python3 python3-venv)",
         call. = FALSE)
  }
  pydir <- system.file("python", package = "privatekeras")
  requirements <- file.path(pydir, "requirements.txt")
  pins <- if (role == "client") client_pins(requirements)
  if (role == "all" && !file.exists("/usr/include/sodium.h")) {
    warning("libsodium headers not found; the secure kernels will not build. ",
            "Install them first (Debian: apt-get install g++ libsodium-dev).", call. = FALSE)
  }
  if (force && reticulate::virtualenv_exists(envname)) {
    reticulate::virtualenv_remove(envname, confirm = FALSE)
  }
  if (!reticulate::virtualenv_exists(envname)) {
    message("privatekeras: creating virtualenv '", envname, "' from ", python)
    if (role == "client") {
      # Nothing beyond the pins below: no unpinned numpy, pip or setuptools upgrades.
      reticulate::virtualenv_create(envname, python = python, packages = FALSE)
    } else {
      reticulate::virtualenv_create(envname, python = python)
    }
  }
  py <- reticulate::virtualenv_python(envname)
  run <- function(args, what, env = character()) {
    message("privatekeras: ", what)
    status <- system2(py, args, env = env)
    if (!identical(status, 0L)) stop("privatekeras: failed while ", what, call. = FALSE)
  }
  pip <- c("-m", "pip", "install", "-q", "--disable-pip-version-check")
  if (role == "client") {
    run(c(pip, shQuote(pins)),
        paste0("installing the client's packages: ", paste(pins, collapse = ", ")))
    installed <- system2(py, c("-c", shQuote(paste(
      "import importlib.metadata as m, numpy, grpc, google.protobuf",
      "print(', '.join(n + ' ' + m.version(n) for n in ('numpy', 'grpcio', 'protobuf')))",
      sep = "; "))), stdout = TRUE, stderr = TRUE)
    if (!is.null(attr(installed, "status"))) {
      stop("privatekeras: the client environment does not import its packages:\n",
           paste(installed, collapse = "\n"), call. = FALSE)
    }
    message("privatekeras: done. Client environment (no TensorFlow) in ", dirname(dirname(py)),
            "\n  installed: ", installed[[length(installed)]], "\n  Python: ", py, "\n  ",
            use_hint(envname, py))
    return(invisible(py))
  }
  run(c(pip, "-r", shQuote(requirements)),
      "installing the pinned Python stack (TensorFlow, Keras, ...): a few minutes")
  run(c(pip, "--no-deps", "-r", shQuote(file.path(pydir, "requirements-nodeps.txt"))),
      "installing TF Encrypted 0.9.1 (without its broken pins)")
  run(c("-m", "privatekeras.kernels", "build"),
      "building the secure kernels for this TensorFlow",
      env = paste0("PYTHONPATH=", shQuote(pydir)))
  message("privatekeras: done. Full environment (TensorFlow, TF Encrypted, secure kernels) in ",
          dirname(dirname(py)), "\n  Python: ", py, "\n  ", use_hint(envname, py))
  invisible(py)
}

# The client's packages, pinned as in requirements.txt (the one place versions are written).
client_pins <- function(requirements, packages = c("numpy", "grpcio", "protobuf")) {
  lines <- trimws(readLines(requirements, warn = FALSE))
  m <- regmatches(lines, regexec("^([A-Za-z0-9_.-]+)==([^[:space:]#;]+)", lines))
  m <- m[lengths(m) == 3L]
  names <- tolower(vapply(m, `[[`, "", 2L))
  pins <- vapply(packages, function(p) {
    hit <- m[names == p]
    if (length(hit) != 1L) {
      stop(sprintf("%s must pin %s exactly once (name==version)", requirements, p),
           call. = FALSE)
    }
    paste0(hit[[1]][[2]], "==", hit[[1]][[3]])
  }, "")
  unname(pins)
}

use_hint <- function(envname, py) {
  if (identical(envname, "r-privatekeras")) {
    "Restart R, then library(privatekeras)."
  } else {
    paste0("Restart R with RETICULATE_PYTHON=", py, ", then library(privatekeras).")
  }
}
