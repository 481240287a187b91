# pk_cluster_from_config() against real workers: the owner and a client reach the workers
# with the certificates a hosts file names, as on separate hosts. The workers run on this
# machine, their APIs on its network address (a hosts file refuses loopback names: other hosts
# could not reach them), started by pk_start() in the owner's R process, which makes a
# throw-away CA for worker0..2, "owner" and "client"; the hosts file points at that CA's
# files, so every call the owner and the client make is authenticated with credentials read
# through the file.

# This machine's first non-loopback IPv4 address, or NULL.
network_address <- function() {
  out <- tryCatch(suppressWarnings(system2("hostname", "-I", stdout = TRUE, stderr = FALSE)),
                  error = function(e) character())
  ips <- strsplit(paste(out, collapse = " "), "[[:space:]]+")[[1]]
  ips <- ips[grepl("^[0-9]+(\\.[0-9]+){3}$", ips) & !startsWith(ips, "127.")]
  if (length(ips)) ips[[1]] else NULL
}

hosts_file <- function(dir, hosts, certs) {
  ip <- sub(":[0-9]+$", "", hosts)
  ports <- as.integer(sub(".*:", "", hosts))
  # Link, compute and mesh ports are listed (the file needs them) but used by workers only.
  workers <- sprintf(paste("[[workers]]", "name = \"worker%d\"", "api = \"%s\"",
                           "link = \"%s:%d\"", "compute_port = %d", "mesh_port = %d",
                           sep = "\n"),
                     0:2, hosts, ip, ports - 30000L, ports - 20000L, ports - 10000L)
  path <- file.path(dir, "hosts.toml")
  writeLines(c("[cluster]", sprintf("ca = \"%s\"", file.path(certs, "ca.crt")),
               sprintf("certs = \"%s\"", certs), "", workers, "",
               "[owner]", "name = \"owner\"", "", "[[clients]]", "name = \"client\""), path)
  path
}

test_that("pk_cluster_from_config() serves and queries through a hosts file", {
  skip_if_no_privatekeras()
  skip_if_not_installed("callr")
  ip <- network_address()
  skip_if(is.null(ip), "this machine has no non-loopback IPv4 address")
  m <- tutorial_model()
  hosts <- sub("^localhost", ip, free_hosts())
  cl <- pk_cluster(hosts)
  pk_start(cl)
  on.exit(pk_stop(cl), add = TRUE)
  pki <- reticulate::import("privatekeras.deploy.pki")
  certs <- pki$local_dir(cl$py$`_local_key`())
  dir <- tempfile("hosts")
  dir.create(dir)
  path <- hosts_file(dir, hosts, certs)

  owner <- pk_cluster_from_config(path, "owner")
  expect_s3_class(owner, "pk_cluster")
  expect_equal(owner$hosts, hosts)
  expect_equal(owner$role, "owner")
  expect_output(print(owner), paste0("hosts file .*hosts.toml, as owner \\(owner\\)"))
  expect_output(print(owner), "external workers")
  # Its workers run elsewhere: pk_start() refuses, naming the command that starts them.
  expect_error(pk_start(owner), "privatekeras worker", class = "privatekeras_ClusterError")
  # A name the file does not list, or a worker's name: classed errors naming the file.
  err <- tryCatch(pk_cluster_from_config(path, "mallory"), error = function(e) e)
  expect_s3_class(err, "privatekeras_ConfigError")
  expect_s3_class(err, "privatekeras_ClusterError")
  expect_match(conditionMessage(err), "no party named 'mallory'.*known: worker0")
  expect_error(pk_cluster_from_config(path, "worker1"), "is a worker",
               class = "privatekeras_ConfigError")

  sm <- share(m$path, owner, input_range = c(0, 1))
  client <- callr::r_bg(function(path, images) {
    library(privatekeras)
    cl <- pk_cluster_from_config(path, "client")
    client <- connect(cl, c(1, 28, 28, 1), c(1, 10), timeout = 120)
    q <- query(client, images[1:2, , , , drop = FALSE])
    disconnect(client)
    list(q = q, printed = capture.output(print(cl)))
  }, args = list(path = path, images = m$images))
  n <- tryCatch(serve(sm, num_requests = 2, idle_timeout = 180), error = function(e) e)
  client$wait(60000)
  if (inherits(n, "error")) {
    stop("serve: ", conditionMessage(n), "\n--- client:\n",
         paste(client$read_all_error_lines(), collapse = "\n"), "\n", cluster_logs(cl),
         call. = FALSE)
  }
  res <- client$get_result()
  expect_equal(n, 2L)
  expect_private_matches(res$q, m$logits[1:2, , drop = FALSE])
  expect_match(paste(res$printed, collapse = "\n"), "as client \\(client\\)")

  # A party whose certificate does not match its entry is refused when the cluster is made:
  # the owner's certificate listed for the client.
  bad <- readLines(path)
  bad <- c(bad, sprintf("cert = \"%s\"", file.path(certs, "owner.crt")),  # under [[clients]]
           sprintf("key = \"%s\"", file.path(certs, "owner.key")))
  writeLines(bad, path)
  err <- tryCatch(pk_cluster_from_config(path, "client"), error = function(e) e)
  expect_s3_class(err, "privatekeras_ClusterError")
  expect_match(conditionMessage(err), "is for 'owner' \\(owner\\).*lists it for 'client'")
})

# The Python core's progress messages follow options(privatekeras.verbose); TensorFlow's
# native start-up lines never reach the R user. Run in a fresh R process, whose whole output
# (stdout and stderr) is read, with TF_CPP_MIN_LOG_LEVEL unset as in a user's session.
OUTPUT_SCRIPT <- '
args <- commandArgs(trailingOnly = TRUE)
library(privatekeras)
if (args[[2]] == "quiet") options(privatekeras.verbose = FALSE)
keras <- reticulate::import("keras")
model <- keras$Sequential(list(keras$Input(shape = list(4L), batch_size = 1L),
                               keras$layers$Dense(3L)))
cl <- pk_cluster(strsplit(args[[1]], ",")[[1]])
pk_start(cl)
sm <- share(model, cl, input_range = c(0, 1))
pk_stop(cl)
cat("script: done\n")
'

run_output_script <- function(mode) {
  script <- tempfile(fileext = ".R")
  writeLines(OUTPUT_SCRIPT, script)
  env <- child_env(TF_CPP_MIN_LOG_LEVEL = NULL)
  res <- processx::run(file.path(R.home("bin"), "Rscript"),
                       c(script, paste(free_hosts(), collapse = ","), mode), env = env,
                       error_on_status = FALSE, stderr_to_stdout = TRUE, timeout = 300)
  list(status = res$status, lines = strsplit(res$stdout, "\n")[[1]])
}

test_that("options(privatekeras.verbose = FALSE) silences the core; TensorFlow stays quiet", {
  skip_if_no_privatekeras()
  skip_if_not_installed("processx")
  native <- "^I0000|^W0000|oneDNN|cpu_feature_guard|Started server|absl::InitializeLog"

  loud <- run_output_script("verbose")
  expect_equal(loud$status, 0, info = paste(loud$lines, collapse = "\n"))
  expect_true(any(grepl("^privatekeras: starting 3 workers", loud$lines)),
              info = paste(loud$lines, collapse = "\n"))
  expect_true(any(grepl("^privatekeras: workers stopped", loud$lines)))
  expect_false(any(grepl(native, loud$lines)), info = paste(loud$lines, collapse = "\n"))

  quiet <- run_output_script("quiet")
  expect_equal(quiet$status, 0, info = paste(quiet$lines, collapse = "\n"))
  expect_equal(quiet$lines, "script: done")
})

test_that("the verbosity option reaches Python's privatekeras logger in this session", {
  skip_if_no_privatekeras()
  logging <- reticulate::import("logging")
  logger <- logging$getLogger("privatekeras")
  old <- options(privatekeras.verbose = FALSE)
  on.exit({
    options(old)
    privatekeras:::sync_verbosity()
  }, add = TRUE)
  pk_cluster(free_hosts())  # any call into the core applies the option
  expect_equal(logger$getEffectiveLevel(), logging$WARNING)
  options(privatekeras.verbose = "quiet")
  pk_cluster(free_hosts())
  expect_gt(logger$getEffectiveLevel(), logging$CRITICAL)
  options(privatekeras.verbose = TRUE)
  pk_cluster(free_hosts())
  expect_equal(logger$getEffectiveLevel(), logging$INFO)
  options(privatekeras.verbose = 3)
  expect_error(pk_cluster(free_hosts()), "must be TRUE, FALSE, \"quiet\"")
})
