# The model owner's script (the 2020 tutorial's "serve" notebook, in privatekeras):
#   Rscript serve.R model.keras [hosts] [num_requests]
library(privatekeras)

args <- commandArgs(trailingOnly = TRUE)
model_file <- args[[1]]
hosts <- if (length(args) >= 2) strsplit(args[[2]], ",")[[1]] else
  c("localhost:4000", "localhost:4001", "localhost:4002")
num_requests <- if (length(args) >= 3) as.integer(args[[3]]) else 3L

cl <- pk_cluster(hosts)
pk_start(cl)
sm <- share(model_file, cl, input_range = c(0, 1))   # pixels scaled to [0, 1]
print(sm)
serve(sm, num_requests = num_requests)
pk_stop(cl)
cat("owner: served", num_requests, "private queries\n")
