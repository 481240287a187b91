#' Define a server for encrypted predictions (CKKS)
#'
#' The second backend of privatekeras: **one** server, homomorphic encryption
#' (CKKS, Microsoft SEAL through TenSEAL). The model owner uploads a model
#' whose prediction is an inverse link applied to a linear predictor: an
#' `lm()` or `glm()` fit, a Keras model made only of Dense, Dropout and
#' Normalization layers, or a coefficient matrix. **The server sees the model
#' in clear.** A client generates its keys in its own R session, keeps the
#' secret key there, sends only its public context and its rows encrypted,
#' and decrypts the answers itself: the server never sees an input or an
#' answer. The server computes the linear predictor; the client applies the
#' inverse link (`query(..., activation = TRUE)`).
#'
#' The verbs are the cluster's: [pk_start()] / [pk_stop()], [share()],
#' [serve()], [connect()], [query()], [disconnect()]. A model with a hidden
#' nonlinearity (a ReLU between two layers) cannot be evaluated exactly under
#' CKKS and is refused by [share()]: serve it on a [pk_cluster()] (three-party
#' computation) instead. The server's API uses the same mutual TLS as a
#' cluster's workers; with `auto_managed = TRUE`, [pk_start()] spawns it with
#' a throw-away certificate authority that clients of the same user find by
#' the address.
#'
#' For a model fitted in R, the formula's terms, factor levels and contrasts
#' travel in the served model's public description, so a client queries with
#' a data frame, as with `predict()`; only formulas made of variables,
#' arithmetic and a few functions (`log`, `exp`, `sqrt`, `I`, `poly`,
#' `scale`, ...) are accepted on the client.
#'
#' @param host The `"host:port"` address of the server's API.
#' @param scheme `"ckks"`, the only one-server scheme.
#' @param auto_managed Whether [pk_start()] spawns the server here.
#' @param start_timeout Seconds to wait for the server to answer.
#' @return A `pk_server` object (also a `pk_cluster`): pass it to
#'   [pk_start()], [share()] or [connect()].
#' @family cluster
#' @seealso `vignette("encrypted-glm", package = "privatekeras")`;
#'   [pk_cluster()] for three-party computation (the model stays secret too).
#' @examples
#' if (pk_available()) {
#'   pk_server("localhost:4710")    # a description: nothing starts until pk_start()
#' }
#' \dontrun{
#' srv <- pk_server("localhost:4100")
#' pk_start(srv)
#' fit <- glm(I(Species == "virginica") ~ ., family = binomial, data = iris)
#' sm <- share(fit, srv)               # the coefficients go to the server in clear
#' serve(sm, num_requests = 1)         # blocks: run it in the model owner's process
#' # a client, in another R session of the same user:
#' client <- connect(pk_server("localhost:4100", auto_managed = FALSE))
#' p <- query(client, iris, activation = TRUE)   # = predict(fit, type = "response")
#' }
#' @export
pk_server <- function(host = "localhost:4100", scheme = "ckks", auto_managed = TRUE,
                      start_timeout = 60) {
  if (!is.character(host) || length(host) != 1L || is.na(host) ||
      !grepl("^.+:[0-9]+$", host)) {
    stop("`host` must be one \"host:port\" address, e.g. \"localhost:4100\"; got ",
         deparse1(host), call. = FALSE)
  }
  if (!identical(scheme, "ckks")) {
    stop("`scheme` must be \"ckks\" (homomorphic encryption on one server); three-party ",
         "computation runs on a pk_cluster() of three workers", call. = FALSE)
  }
  if (!is.logical(auto_managed) || length(auto_managed) != 1L || is.na(auto_managed)) {
    stop("`auto_managed` must be TRUE or FALSE", call. = FALSE)
  }
  if (!is.numeric(start_timeout) || length(start_timeout) != 1L || is.na(start_timeout) ||
      start_timeout <= 0) {
    stop("`start_timeout` must be a positive number of seconds", call. = FALSE)
  }
  py <- pk_call(pk_core()$Server(host, scheme = scheme, auto_managed = auto_managed,
                                 start_timeout = as.numeric(start_timeout)))
  structure(list(py = py, hosts = unlist(py$hosts), protocol = "ckks", scheme = "ckks"),
            class = c("pk_server", "pk_cluster"))
}

#' @export
print.pk_server <- function(x, ...) {
  py <- x$py
  state <- if (isTRUE(py$running)) sprintf("running, pid %s", unlist(py$pids)[[1]]) else
    if (isTRUE(py$auto_managed)) "stopped" else "not managed here"
  cat("<privatekeras server> scheme ckks (homomorphic encryption, one server), ",
      if (isTRUE(py$auto_managed)) "auto-managed" else "external server", "\n", sep = "")
  cat("  the server sees the model in clear; clients' inputs and answers stay encrypted\n")
  cat(sprintf("  server  %-22s %s (API with mutual TLS)\n", x$hosts[[1]], state))
  invisible(x)
}

# share() on a pk_server: the model, converted here, goes to the server in clear.
share_ckks <- function(model, server, input_range = NULL) {
  input_range <- check_range_arg(input_range)
  ckks <- pk_core()$ckks
  linear <- if (inherits(model, "lm")) {
    ckks_from_fit(model, ckks)
  } else if (is.matrix(model) && is.numeric(model)) {
    pk_call(ckks$LinearModel(model, feature_names = rownames(model),
                             output_names = colnames(model)))
  } else if (is.character(model)) {
    if (length(model) != 1L || !file.exists(model)) {
      stop("`model` is not an existing .keras/.h5 file: ", deparse1(model), call. = FALSE)
    }
    normalizePath(model)
  } else if (inherits(model, "python.builtin.object")) {
    model
  } else {
    stop("`model` must be an lm() or glm() fit, a Keras model (Dense, Dropout and ",
         "Normalization layers only), a .keras/.h5 path or a numeric coefficient matrix; got ",
         "an object of class ", paste(class(model), collapse = "/"), call. = FALSE)
  }
  py <- pk_call(pk_core()$share(linear, server$py, input_range = input_range))
  structure(list(py = py, cluster = server), class = c("pk_ckks_model", "pk_shared_model"))
}

# An lm()/glm() fit as privatekeras.ckks.LinearModel: coefficients, link and what a client
# needs to build the model matrix from a data frame (formula, variables, factor levels,
# contrasts).
ckks_from_fit <- function(fit, ckks) {
  tt <- stats::delete.response(stats::terms(fit))
  if (!is.null(attr(tt, "offset")) || (!is.null(fit$offset) && any(fit$offset != 0))) {
    stop("models with an offset are not served on the CKKS backend yet", call. = FALSE)
  }
  beta <- stats::coef(fit)
  beta <- if (is.matrix(beta)) beta else matrix(beta, ncol = 1L, dimnames = list(names(beta)))
  if (anyNA(beta)) {
    warning("coefficients ", paste(rownames(beta)[rowSums(is.na(beta)) > 0], collapse = ", "),
            " are NA (aliased): served as 0, as predict() does", call. = FALSE)
    beta[is.na(beta)] <- 0
  }
  has_intercept <- "(Intercept)" %in% rownames(beta)
  intercept <- if (has_intercept) beta["(Intercept)", ] else rep(0, ncol(beta))
  w <- beta[rownames(beta) != "(Intercept)", , drop = FALSE]
  if (nrow(w) == 0L) stop("the model has no predictor: nothing to encrypt", call. = FALSE)
  contrasts <- fit$contrasts
  if (!all(vapply(contrasts, is.character, logical(1)))) {
    stop("only contrasts given by name (e.g. \"contr.treatment\") are served", call. = FALSE)
  }
  link <- if (inherits(fit, "glm")) fit$family$link else "identity"
  r_terms <- list(
    formula = paste(deparse(stats::formula(tt), width.cutoff = 500L), collapse = " "),
    predvars = paste(deparse(attr(tt, "predvars"), width.cutoff = 500L), collapse = " "),
    xlevels = lapply(fit$xlevels, as.list),
    contrasts = lapply(contrasts, identity),
    data_classes = as.list(attr(tt, "dataClasses")),
    intercept = has_intercept,
    family = if (inherits(fit, "glm")) fit$family$family else "gaussian"
  )
  name <- paste(deparse(stats::formula(fit), width.cutoff = 500L), collapse = " ")
  pk_call(ckks$from_r(unname(w), unname(intercept), link, as.list(rownames(w)),
                      output_names = if (is.null(colnames(beta))) list("eta") else
                        as.list(colnames(beta)),
                      name = name, r_terms = r_terms))
}

#' @export
print.pk_ckks_model <- function(x, ...) {
  py <- x$py
  spec <- py$public_spec
  cat("<privatekeras shared model> '", py$spec$name, "' on CKKS (the server holds it in clear)\n",
      sep = "")
  cat("  features     ", length(spec$features), " (", paste(utils::head(unlist(spec$features), 6),
                                                       collapse = ", "),
      if (length(spec$features) > 6) ", ..." else "", ")\n", sep = "")
  cat("  outputs      ", spec$output_shape[[2]],
      if (!is.null(spec$output_activation))
        paste0(" (", spec$output_activation, " applied by the client)"), "\n", sep = "")
  cat("  encryption   ", pk_core()$ckks$describe(spec$ckks), "\n", sep = "")
  cat("  state        ", if (isTRUE(py$serving)) "serving" else "not serving",
      ", ", py$served, " queries answered\n", sep = "")
  cat("  server       ", x$cluster$hosts[[1]], "\n", sep = "")
  invisible(x)
}

# connect() on a pk_server.
connect_ckks <- function(server, timeout = 60) {
  if (!is.numeric(timeout) || length(timeout) != 1L || is.na(timeout) || timeout <= 0) {
    stop("`timeout` must be a positive number of seconds", call. = FALSE)
  }
  py <- pk_call(pk_core()$connect(server$py, timeout = as.numeric(timeout)))
  structure(list(py = py, cluster = server), class = c("pk_ckks_client", "pk_client"))
}

#' @export
print.pk_ckks_client <- function(x, ...) {
  cat("<privatekeras client> CKKS: keys made and kept in this R session\n")
  cat("  server       ", x$cluster$hosts[[1]], "\n", sep = "")
  spec <- x$py$`_spec`
  if (!is.null(spec)) {
    cat("  served model '", spec$name, "': ", spec$input_shape[[2]], " features -> ",
        spec$output_shape[[2]], " outputs\n", sep = "")
  }
  invisible(x)
}

# query() on a CKKS client: a data frame (for a model fitted in R) or a numeric matrix.
query_ckks <- function(client, x, activation = FALSE) {
  if (!is.logical(activation) || length(activation) != 1L || is.na(activation)) {
    stop("`activation` must be TRUE or FALSE", call. = FALSE)
  }
  spec <- pk_call(client$py$describe())
  x <- ckks_rows(x, spec)
  out <- if (activation) pk_call(client$py$predict_proba(x)) else pk_call(client$py$query(x))
  out <- as_logit_matrix(out)
  names <- unlist(spec$outputs)
  colnames(out) <- if (activation && length(names) == 1L) "response" else names
  out
}

# The rows to encrypt: a numeric matrix with the served model's features as columns.
ckks_rows <- function(x, spec) {
  features <- unlist(spec$features)
  if (is.data.frame(x) && !is.null(spec$r_terms)) {
    x <- ckks_model_matrix(spec$r_terms, x)
  } else if (is.data.frame(x)) {
    missing <- setdiff(features, names(x))
    if (length(missing) == 0L) x <- x[features]
    x <- as.matrix(x)
  }
  if (is.null(dim(x)) && is.numeric(x)) x <- matrix(x, nrow = 1L)
  if (!is.numeric(x) || is.logical(x) || length(dim(x)) != 2L) {
    stop("`x` must be a data frame or a numeric matrix of rows; got an object of class ",
         paste(class(x), collapse = "/"), call. = FALSE)
  }
  if (ncol(x) != length(features)) {
    stop(sprintf("the served model takes %d features per row (%s); `x` has %d columns",
                 length(features), paste(features, collapse = ", "), ncol(x)), call. = FALSE)
  }
  if (!is.null(colnames(x)) && !identical(colnames(x), features) &&
      setequal(colnames(x), features)) {
    x <- x[, features, drop = FALSE]
  }
  if (nrow(x) == 0L) stop("`x` is an empty batch (0 rows)", call. = FALSE)
  if (anyNA(x) || any(!is.finite(x))) {
    stop("`x` contains NA, NaN or infinite values; encrypted prediction needs finite numbers",
         call. = FALSE)
  }
  storage.mode(x) <- "double"
  unname(x)
}

# Functions a served formula may call (evaluated here, on the client, on the client's data).
ckks_formula_functions <- c(
  "~", "+", "-", "*", "/", "^", ":", "%in%", "(", "I", "log", "log1p", "log2", "log10", "exp",
  "expm1", "sqrt", "abs", "sin", "cos", "poly", "scale", "offset", "list", "c",
  "factor", "as.factor", "as.numeric", "as.integer", "pmin", "pmax", "cut", "relevel",
  "==", "!=", "<", ">", "<=", ">=", "&", "|", "!", "ifelse")

ckks_check_expr <- function(e) {
  if (is.call(e)) {
    f <- e[[1]]
    if (!is.name(f) || !(as.character(f) %in% ckks_formula_functions)) {
      stop("the served model's formula calls ", deparse1(f), ", which a client does not ",
           "evaluate (allowed: ", paste(ckks_formula_functions[-(1:9)], collapse = ", "), ")",
           call. = FALSE)
    }
    for (a in as.list(e)[-1]) if (!missing(a)) ckks_check_expr(a)
  } else if (!(is.name(e) || is.atomic(e) || is.null(e))) {
    stop("the served model's formula holds an object of type ", typeof(e), call. = FALSE)
  }
  invisible(TRUE)
}

# The model matrix of `newdata` for a model fitted in R, from its public terms, as
# predict.lm() builds it; the intercept column is left out (the server adds the intercept).
ckks_model_matrix <- function(r_terms, newdata) {
  formula <- str2lang(r_terms$formula)
  predvars <- str2lang(r_terms$predvars)
  ckks_check_expr(formula)
  ckks_check_expr(predvars)
  env <- list2env(list(poly = stats::poly, offset = stats::offset), parent = baseenv())
  tt <- stats::terms(eval(formula, env))
  attr(tt, "predvars") <- predvars
  environment(tt) <- env
  xlev <- lapply(r_terms$xlevels, unlist)
  mf <- tryCatch(stats::model.frame(tt, newdata, xlev = xlev, na.action = stats::na.pass),
                 error = function(e) {
                   stop("cannot build the served model's variables from `x`: ",
                        conditionMessage(e), call. = FALSE)
                 })
  classes <- unlist(r_terms$data_classes)
  if (length(classes)) {
    tryCatch(stats::.checkMFClasses(classes, mf), error = function(e) {
      stop("`x` does not match the served model's variables: ", conditionMessage(e),
           call. = FALSE)
    })
  }
  contrasts <- if (length(r_terms$contrasts)) lapply(r_terms$contrasts, unlist) else NULL
  mm <- stats::model.matrix(tt, mf, contrasts.arg = contrasts)
  mm[, colnames(mm) != "(Intercept)", drop = FALSE]
}
