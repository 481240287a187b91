# The R client's process of one benchmark configuration: the same steps as client.py,
# through the R package's public verbs (connect(), query(), disconnect()).
#
#   Rscript bench/client.R HOSTS BATCH COUNT IMAGES OUT PAIRS
#
# Talks to run.py in `@@ WORD` lines on stdout and one word per line on stdin. After the
# measured queries it sends PAIRS more queries of the first batch, each timed both in R and
# inside the Python core: the differences are the R layer's own cost, free of the load drift
# between two separate runs.
suppressPackageStartupMessages(library(privatekeras))

args <- commandArgs(trailingOnly = TRUE)
hosts <- strsplit(args[[1]], ",")[[1]]
batch <- as.integer(args[[2]])
count <- as.integer(args[[3]])
np <- reticulate::import("numpy", convert = TRUE)
images <- np$load(args[[4]])[seq_len(count), , , , drop = FALSE]
out <- args[[5]]
pairs <- as.integer(args[[6]])

stdin_con <- file("stdin", open = "r")
say <- function(word) {
  cat("@@", word, "\n")
  flush(stdout())
}
wait_for <- function(word) {
  line <- readLines(stdin_con, n = 1L)
  if (length(line) != 1L || trimws(line) != word) {
    stop(sprintf("expected '%s' from run.py on stdin, got '%s'", word, paste(line)))
  }
}

client <- connect(pk_cluster(hosts, auto_managed = FALSE), c(batch, 28, 28, 1), c(batch, 10),
                  timeout = 300)
say("CONNECTED")
wait_for("GO")
starts <- seq(1L, count, by = batch)
logits <- vector("list", length(starts))
seconds <- numeric(length(starts))
for (i in seq_along(starts)) {
  if (i == 2L) {
    say("SNAP")
    wait_for("OK")
  }
  rows <- starts[[i]]:min(count, starts[[i]] + batch - 1L)
  x <- images[rows, , , , drop = FALSE]
  t <- Sys.time()
  logits[[i]] <- query(client, x)
  seconds[[i]] <- as.double(difftime(Sys.time(), t, units = "secs"))
}
say("SNAP")
wait_for("OK")
x <- images[seq_len(min(batch, count)), , , , drop = FALSE]
# The R layer's own cost, free of network and load noise: each query(client, x) is timed in
# R and, around the Python core's client.query() it calls, in Python; the difference is what
# the R path adds over a Python client (argument checks, R <-> NumPy conversions).
reticulate::py_run_string(paste(
  "import time",
  "def _pk_time_queries(client):",
  "    inner = client.query",
  "    def query(x):",
  "        t = time.perf_counter()",
  "        try:",
  "            return inner(x)",
  "        finally:",
  "            query.last = time.perf_counter() - t",
  "    client.query = query",
  "    return query", sep = "\n"))
timer <- reticulate::py$`_pk_time_queries`(client$py)
paired <- numeric(pairs)
for (i in seq_len(pairs)) {
  t <- Sys.time()
  query(client, x)
  t_r <- as.double(difftime(Sys.time(), t, units = "secs"))
  paired[[i]] <- t_r - reticulate::py_to_r(reticulate::py_get_attr(timer, "last"))
}
np$savez(out, logits = do.call(rbind, logits), seconds = seconds, paired = paired)
disconnect(client)
say("DONE")
