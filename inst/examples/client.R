# The client's script, in another R process:
#   Rscript client.R [hosts] [n_images]
# A client needs no TensorFlow: install_privatekeras(role = "client") is enough here.
library(privatekeras)

args <- commandArgs(trailingOnly = TRUE)
hosts <- if (length(args) >= 1) strsplit(args[[1]], ",")[[1]] else
  c("localhost:4000", "localhost:4001", "localhost:4002")
n <- if (length(args) >= 2) as.integer(args[[2]]) else 3L

fashion <- pk_fashion_mnist()
cl <- pk_cluster(hosts, auto_managed = FALSE)   # the same workers; started by the owner
client <- connect(cl, input_shape = c(1, 28, 28, 1), output_shape = c(1, 10), timeout = 300)

for (i in seq_len(n)) {
  res <- query(client, fashion$test$x[i, , , , drop = FALSE])
  cat(sprintf("Actual: %d, predicted: %d\n", fashion$test$y[[i]], which.max(res) - 1L))
}
