#' Install the Python side of privatekeras
#'
#' Creates a Python virtualenv and installs what this machine's role needs,
#' pinned to the versions in the package's `python/requirements.txt`. Safe to
#' re-run: only what is missing is done. It needs no root rights; the system
#' libraries it checks for come from your distribution.
#'
#' * `role = "all"` (the default): everything, for the model owner and for
#'   workers started here by [pk_start()]: the pinned stack (TensorFlow 2.20
#'   with Keras 3, TF Encrypted 0.9.1 without its broken pins), and
#'   privatekeras' secure kernels (ChaCha20 CSPRNG and ABY3 bit operations),
#'   compiled against that TensorFlow. Downloads a few hundred MB (about
#'   1.5 GB installed) and takes a few minutes; pip's progress is shown as it
#'   goes. Needs a C++ compiler and
#'   libsodium's headers.
#' * `role = "client"`: what a client needs to [connect()] and [query()], and
#'   nothing more: `numpy`, `grpcio` and `protobuf`, plus `tenseal` for a
#'   [pk_server()] (encrypted predictions). No TensorFlow (a client
#'   never computes with it), no kernels to build; it takes well under a
#'   minute. Such an environment cannot [share()] a model or [pk_start()]
#'   workers.
#'
#' **Which Python.** Unless `python` is given, the first Python >= 3.10 with
#' the `venv` module among `/usr/bin/python3`, `python3.13` ... `python3.10`
#' and `python3` on the `PATH`. The system's own Python comes first on purpose:
#' R puts the system's library directory on `LD_LIBRARY_PATH`, so a Python
#' built elsewhere (pyenv, conda) may load the wrong `libpython` when R starts
#' it.
#'
#' **System requirements** are checked before anything is downloaded, and a
#' missing one is an error naming the package to install (Debian/Ubuntu
#' names): the `venv` module (`python3-venv`), and for `role = "all"` a C++
#' compiler (`g++`) and libsodium, found with `pkg-config` (`pkg-config`,
#' `libsodium-dev`).
#'
#' At the end it reports what it installed and where: the environment's
#' directory, its Python, the main packages with their versions and (for
#' `role = "all"`) the compiled kernels. The default environment name,
#' `"r-privatekeras"`, is found by `library(privatekeras)` on its own; for
#' another name or a path, set `RETICULATE_PYTHON` to the returned Python
#' before loading the package.
#'
#' @param envname Name of the virtualenv (default `"r-privatekeras"`, kept
#'   where reticulate keeps virtualenvs: `~/.virtualenvs` unless `WORKON_HOME`
#'   says otherwise), or a path.
#' @param python The Python (>= 3.10) to create the virtualenv from, or `NULL`
#'   to look for one.
#' @param force Recreate the virtualenv from scratch.
#' @param role `"all"` (owner and workers) or `"client"` (queries only).
#' @return The path of the environment's Python, invisibly.
#' @family setup
#' @seealso [pk_available()] to check an installation; the README's "Install"
#'   section for the whole sequence.
#' @examples
#' # Which Python would be used, and is the Python side already there?
#' privatekeras:::find_python()
#' pk_available()
#'
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
  if (!is.character(envname) || length(envname) != 1L || is.na(envname) || !nzchar(envname)) {
    stop("`envname` must be the name or path of a virtualenv, e.g. \"r-privatekeras\"",
         call. = FALSE)
  }
  role <- match.arg(role)
  python <- find_python(python)
  check_system(role)
  pydir <- system.file("python", package = "privatekeras")
  requirements <- file.path(pydir, "requirements.txt")
  pins <- if (role == "client") client_pins(requirements)
  if (force && reticulate::virtualenv_exists(envname)) {
    reticulate::virtualenv_remove(envname, confirm = FALSE)
  }
  if (!reticulate::virtualenv_exists(envname)) {
    message("privatekeras: creating virtualenv '", envname, "' from ", python, " (Python ",
            attr(python, "version"), ")")
    if (role == "client") {
      # Nothing beyond the pins below: no unpinned numpy, pip or setuptools upgrades.
      reticulate::virtualenv_create(envname, python = python, packages = FALSE)
    } else {
      reticulate::virtualenv_create(envname, python = python)
    }
  }
  py <- reticulate::virtualenv_python(envname)
  env <- c("TF_CPP_MIN_LOG_LEVEL=2", paste0("PYTHONPATH=", shQuote(pydir)))
  run <- function(args, what) {
    message("privatekeras: ", what)
    status <- system2(py, args, env = env)
    if (!identical(status, 0L)) {
      stop("privatekeras: failed while ", what, " (exit status ", status, "); the output ",
           "above says why", call. = FALSE)
    }
  }
  # pip's own output (what it collects and downloads) is the progress report.
  pip <- c("-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "on")
  if (role == "client") {
    run(c(pip, shQuote(pins)),
        paste0("installing the client's packages: ", paste(pins, collapse = ", ")))
    report <- installed_report(py, c("numpy", "grpcio", "protobuf", "tenseal"), env,
                               imports = "numpy, grpc, google.protobuf")
    message("privatekeras: done. Client environment (no TensorFlow) in ", env_dir(py),
            "\n  installed: ", report, "\n  Python: ", py, "\n  ", use_hint(envname, py))
    return(invisible(py))
  }
  run(c(pip, "-r", shQuote(requirements)),
      "installing the pinned Python stack (TensorFlow, Keras, ...): a few minutes")
  run(c(pip, "--no-deps", "-r", shQuote(file.path(pydir, "requirements-nodeps.txt"))),
      "installing TF Encrypted 0.9.1 (without its broken pins)")
  run(c("-m", "privatekeras", "kernels", "build"),
      "building the secure kernels for this TensorFlow")
  report <- installed_report(py, c("tensorflow-cpu", "keras", "tf-encrypted", "numpy",
                                   "grpcio", "cryptography"), env)
  kernels <- system2(py, c("-m", "privatekeras", "kernels", "path"), stdout = TRUE,
                     stderr = FALSE, env = env)
  message("privatekeras: done. Full environment (TensorFlow, TF Encrypted, secure kernels) in ",
          env_dir(py), "\n  installed: ", report,
          "\n  secure kernels: ", paste(kernels, collapse = " "),
          "\n  Python: ", py, "\n  ", use_hint(envname, py))
  invisible(py)
}

# The environment's directory, from its Python (<env>/bin/python).
env_dir <- function(py) dirname(dirname(py))

# "name version, ..." of installed distributions, read by the environment's Python; an error
# when they do not import.
installed_report <- function(py, packages, env, imports = NULL) {
  code <- paste(c(
    if (!is.null(imports)) paste("import", imports),
    "import importlib.metadata as m",
    sprintf("print(', '.join(n + ' ' + m.version(n) for n in (%s)))",
            paste0("'", packages, "'", collapse = ", "))),
    collapse = "; ")
  out <- suppressWarnings(system2(py, c("-c", shQuote(code)), stdout = TRUE, stderr = TRUE,
                                  env = env))
  if (!is.null(attr(out, "status"))) {
    stop("privatekeras: the new environment does not import its packages:\n",
         paste(out, collapse = "\n"), call. = FALSE)
  }
  out[[length(out)]]
}

# A Python >= 3.10 with the venv module: `python` if given (checked), else the first suitable
# candidate. Returns its path with attribute "version".
find_python <- function(python = NULL) {
  given <- !is.null(python)
  candidates <- if (given) python else
    c("/usr/bin/python3", Sys.which(paste0("python3.", 13:10)), Sys.which("python3"))
  candidates <- unique(candidates[nzchar(candidates)])
  seen <- character()
  for (cand in candidates) {
    if (!file.exists(cand)) {
      seen <- c(seen, paste0(cand, ": does not exist"))
      next
    }
    info <- python_info(cand)
    if (is.null(info)) {
      seen <- c(seen, paste0(cand, ": does not run"))
    } else if (utils::compareVersion(info$version, "3.10") < 0) {
      seen <- c(seen, paste0(cand, ": Python ", info$version, ", too old"))
    } else if (!info$venv) {
      seen <- c(seen, paste0(cand, ": Python ", info$version, " without the venv module ",
                             "(Debian/Ubuntu: sudo apt-get install python3-venv)"))
    } else {
      return(structure(unname(cand), version = info$version))
    }
  }
  stop("privatekeras needs Python >= 3.10 with the venv module, and found none",
       if (length(seen)) paste0(":\n  ", paste(seen, collapse = "\n  ")) else
         " (no python3 on the PATH)",
       "\nInstall one (Debian/Ubuntu: sudo apt-get install python3 python3-venv) or pass ",
       "`python = \"/path/to/python3\"`.", call. = FALSE)
}

python_info <- function(python) {
  code <- paste0("import sys, importlib.util as u; print('%d.%d.%d' % sys.version_info[:3], ",
                 "u.find_spec('venv') is not None and u.find_spec('ensurepip') is not None)")
  out <- tryCatch(suppressWarnings(system2(python, c("-c", shQuote(code)), stdout = TRUE,
                                           stderr = FALSE)),
                  error = function(e) NULL)
  if (is.null(out) || !is.null(attr(out, "status")) || !length(out)) return(NULL)
  parts <- strsplit(out[[length(out)]], " ", fixed = TRUE)[[1]]
  if (length(parts) != 2L) return(NULL)
  list(version = parts[[1]], venv = identical(parts[[2]], "True"))
}

# The system libraries and tools `role` needs; one error naming every missing package.
check_system <- function(role) {
  if (role == "client") return(invisible(character()))
  missing <- system_missing()
  if (length(missing)) {
    stop("privatekeras cannot build its secure kernels on this machine yet: ",
         paste(names(missing), collapse = "; "), ".\nInstall first (Debian/Ubuntu): ",
         "sudo apt-get install ", paste(unique(missing), collapse = " "), call. = FALSE)
  }
  invisible(character())
}

# What is missing for role "all", as c("what is missing" = "Debian package").
system_missing <- function() {
  missing <- character()
  if (!nzchar(Sys.getenv("CXX")) && !nzchar(Sys.which("g++")) && !nzchar(Sys.which("c++"))) {
    missing[["no C++ compiler (g++)"]] <- "g++"
  }
  pkg_config <- Sys.which("pkg-config")
  if (!nzchar(pkg_config)) {
    missing[["no pkg-config, to find libsodium"]] <- "pkg-config"
    if (!file.exists("/usr/include/sodium.h")) {
      missing[["no libsodium headers"]] <- "libsodium-dev"
    }
  } else if (system2(pkg_config, c("--exists", "libsodium")) != 0L) {
    missing[["libsodium not found by pkg-config"]] <- "libsodium-dev"
  }
  missing
}

# The client's packages, pinned as in requirements.txt (the one place versions are written).
client_pins <- function(requirements,
                        packages = c("numpy", "grpcio", "protobuf", "tenseal")) {
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
