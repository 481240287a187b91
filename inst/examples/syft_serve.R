# The 2020 tutorial's R serving script, with `sy <- import("syft")` replaced by
# `sy <- privatekeras::pk_python()`:  Rscript syft_serve.R weights.h5 [hosts]
library(reticulate)
sy <- privatekeras::pk_python()
tf <- import("tensorflow")
hook <- sy$KerasHook(tf$keras)

args <- commandArgs(trailingOnly = TRUE)
hosts <- if (length(args) >= 2) strsplit(args[[2]], ",")[[1]] else
  c("localhost:4000", "localhost:4001", "localhost:4002")

L <- tf$keras$layers
model <- tf$keras$Sequential()
model$add(L$Conv2D(16L, c(3L, 3L), padding = "same", batch_input_shape = c(1L, 28L, 28L, 1L)))
model$add(L$AveragePooling2D(c(2L, 2L)))
model$add(L$Activation("relu"))
model$add(L$Conv2D(32L, c(3L, 3L), padding = "same"))
model$add(L$AveragePooling2D(c(2L, 2L)))
model$add(L$Activation("relu"))
model$add(L$Conv2D(64L, c(3L, 3L), padding = "same"))
model$add(L$AveragePooling2D(c(2L, 2L)))
model$add(L$Activation("relu"))
model$add(L$Flatten())
model$add(L$Dense(10L, name = "logit"))
model$load_weights(args[[1]])

AUTO <- TRUE
alice <- sy$TFEWorker(host = hosts[[1]], auto_managed = AUTO)
bob <- sy$TFEWorker(host = hosts[[2]], auto_managed = AUTO)
carol <- sy$TFEWorker(host = hosts[[3]], auto_managed = AUTO)
cluster <- sy$TFECluster(alice, bob, carol)
cluster$start()

model$share(cluster)
model$serve(num_requests = 3L)

model$stop()
cluster$stop()
