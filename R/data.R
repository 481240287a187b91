#' Fashion-MNIST, read offline from Debian's dataset-fashion-mnist
#'
#' @param directory Where the IDX files are (default: Debian's location).
#' @return A list with `train` and `test`, each a list of `x` (an array
#'   `n x 28 x 28 x 1` of doubles in `[0, 1]`) and `y` (integer labels 0-9), and
#'   `labels` (the class names).
#' @family setup
#' @examples
#' if (pk_available() && dir.exists("/usr/share/datasets/fashion-mnist")) {
#'   fashion <- pk_fashion_mnist()
#'   print(dim(fashion$test$x))
#'   print(fashion$labels[fashion$test$y[1:5] + 1])
#' }
#' @export
pk_fashion_mnist <- function(directory = NULL) {
  data <- pk_core()$data
  parts <- pk_call(data$load_fashion_mnist(directory))
  part <- function(p) list(x = p[[1]], y = as.integer(p[[2]]))
  list(train = part(parts[[1]]), test = part(parts[[2]]), labels = unlist(data$LABELS))
}
