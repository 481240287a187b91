# The 2020 tutorial's R client script, with `sy <- import("syft")` replaced by
# `sy <- privatekeras::pk_python()`:  Rscript syft_client.R [hosts]
library(reticulate)
sy <- privatekeras::pk_python()

args <- commandArgs(trailingOnly = TRUE)
hosts <- if (length(args) >= 1) strsplit(args[[1]], ",")[[1]] else
  c("localhost:4000", "localhost:4001", "localhost:4002")

AUTO <- TRUE
alice <- sy$TFEWorker(host = hosts[[1]], auto_managed = AUTO)
bob <- sy$TFEWorker(host = hosts[[2]], auto_managed = AUTO)
carol <- sy$TFEWorker(host = hosts[[3]], auto_managed = AUTO)
cluster <- sy$TFECluster(alice, bob, carol)

client <- sy$TFEWorker()
client$connect_to_model(c(1L, 28L, 28L, 1L), c(1L, 10L), cluster)

fashion <- privatekeras::pk_fashion_mnist()
for (i in 1:3) {
  image <- fashion$test$x[i, , , , drop = FALSE]
  res <- client$query_model(image)
  cat(sprintf("Actual: %d, predicted: %d\n", fashion$test$y[[i]], which.max(res) - 1L))
}
