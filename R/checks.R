# Argument checks done in R, before Python is touched. Each failure is one R
# error whose message names the fix.

check_shape <- function(shape, what) {
  ok <- is.numeric(shape) && length(shape) >= 2L && !anyNA(shape) &&
    all(is.finite(shape)) && all(shape >= 1) && all(shape == round(shape))
  if (!ok) {
    stop(sprintf(paste0("`%s` must be a vector of at least two positive whole numbers, ",
                        "batch first, e.g. c(1, 28, 28, 1); got %s"),
                 what, deparse1(shape)), call. = FALSE)
  }
  as.integer(shape)
}

check_count <- function(n, what, allow_null = TRUE) {
  if (is.null(n) && allow_null) return(NULL)
  ok <- is.numeric(n) && length(n) == 1L && !is.na(n) && is.finite(n) && n >= 0 && n == round(n)
  if (!ok) {
    stop(sprintf("`%s` must be a single non-negative whole number%s; got %s", what,
                 if (allow_null) " or NULL" else "", deparse1(n)), call. = FALSE)
  }
  as.integer(n)
}

check_hosts <- function(hosts) {
  if (!is.character(hosts) || length(hosts) != 3L || anyNA(hosts)) {
    stop("`hosts` must be a character vector of exactly 3 \"host:port\" addresses, e.g. ",
         "c(\"localhost:4000\", \"localhost:4001\", \"localhost:4002\")", call. = FALSE)
  }
  bad <- hosts[!grepl("^.+:[0-9]+$", hosts)]
  if (length(bad)) {
    stop(sprintf(paste0("worker address %s has no port: write it as \"host:port\", ",
                        "e.g. \"localhost:4000\""), deparse1(bad[[1]])), call. = FALSE)
  }
  if (anyDuplicated(hosts)) {
    stop("the three worker addresses must be distinct; got ", deparse1(hosts), call. = FALSE)
  }
  hosts
}

# Returns x as an array with a batch dimension, ready for Python.
check_input <- function(x, input_shape) {
  if (is.data.frame(x)) x <- as.matrix(x)
  if (!is.numeric(x) || is.logical(x)) {
    stop(sprintf("`x` must be a numeric array; got an object of class %s",
                 paste(class(x), collapse = "/")), call. = FALSE)
  }
  d <- dim(x)
  if (is.null(d)) d <- length(x)
  item <- input_shape[-1]
  if (length(d) == length(item) && all(d == item)) {
    d <- c(1L, d)
    x <- array(x, dim = d)
  }
  if (length(d) != length(input_shape) || any(d[-1] != item)) {
    stop(sprintf(paste0("`x` has dimensions %s, but this client sends c(n, %s) ",
                        "(slice one image with drop = FALSE, e.g. images[1, , , , drop = FALSE])"),
                 deparse1(as.integer(d)), paste(item, collapse = ", ")), call. = FALSE)
  }
  if (d[[1]] == 0L) stop("`x` is an empty batch (0 rows)", call. = FALSE)
  if (anyNA(x) || any(!is.finite(x))) {
    stop("`x` contains NA, NaN or infinite values; private prediction needs finite numbers",
         call. = FALSE)
  }
  storage.mode(x) <- "double"
  x
}

py_shape <- function(shape) reticulate::tuple(as.list(as.integer(shape)))
