# The parties and who sends what to whom, drawn with base graphics. Used by the vignettes and
# by tools/make-figures.R, which writes man/figures/parties.svg for the README.
draw_parties <- function() {
  op <- graphics::par(mar = c(0, 0, 0, 0), family = "sans")
  on.exit(graphics::par(op))
  graphics::plot.new()
  graphics::plot.window(xlim = c(0, 100), ylim = c(0, 64), asp = NA)
  owner_col <- "#FCE8C8"
  client_col <- "#D8ECD4"
  worker_col <- "#DCE6F4"
  edge <- "#404040"
  box <- function(x0, y0, x1, y1, fill, title, lines) {
    graphics::rect(x0, y0, x1, y1, col = fill, border = edge, lwd = 1.5)
    graphics::text((x0 + x1) / 2, y1 - 2.6, title, font = 2, cex = 0.95)
    for (i in seq_along(lines)) {
      graphics::text((x0 + x1) / 2, y1 - 2.6 - 2.9 * i, lines[[i]], cex = 0.72)
    }
  }
  box(2, 44, 36, 62, owner_col, "Model owner",
      c("holds the trained model W in clear", "splits W into shares here and",
        "sends worker i only its shares of W", "asks worker 0 to serve"))
  box(64, 44, 98, 62, client_col, "Client",
      c("holds its input x in clear", "sends worker i only its shares of x,",
        "fetches worker i's shares of y and", "rebuilds the answer y here"))
  wx <- c(3, 36, 69)
  for (i in 0:2) {
    x0 <- wx[[i + 1]]
    j <- (i + 1) %% 3
    box(x0, 4, x0 + 28, 20, worker_col, sprintf("Worker %d", i),
        c(sprintf("shares %d and %d of W, x and y", i, j),
          "(random-looking on their own)",
          if (i == 0) "starts each private step" else "computes with the others"))
  }
  centre <- wx + 14
  # Owner and client to every worker: the workers' API, mutual TLS.
  for (k in 1:3) {
    graphics::arrows(19, 44, centre[[k]] - 3, 20.5, length = 0.08, col = "#B5651D", lwd = 1.4)
    graphics::arrows(81, 44, centre[[k]] + 3, 20.5, length = 0.08, col = "#2E7D32", lwd = 1.4,
                     code = 3)
  }
  # Between the workers: the protocol.
  graphics::arrows(31.2, 12, 35.8, 12, length = 0.06, code = 3, col = "#1F4E9A", lwd = 2)
  graphics::arrows(64.2, 12, 68.8, 12, length = 0.06, code = 3, col = "#1F4E9A", lwd = 2)
  graphics::arrows(17, 1.2, 17, 4, length = 0.06, col = "#1F4E9A", lwd = 2)
  graphics::segments(17, 1.2, 83, 1.2, col = "#1F4E9A", lwd = 2)
  graphics::arrows(83, 1.2, 83, 4, length = 0.06, col = "#1F4E9A", lwd = 2)
  graphics::text(50, 37.5,
                 "the workers' API: gRPC with mutual TLS\n(certificates of the cluster's CA)",
                 cex = 0.72, font = 3)
  graphics::text(50, 24.2, "ABY3 protocol messages: only between workers",
                 cex = 0.72, col = "#1F4E9A", font = 3)
  graphics::text(50, 53, paste("No worker sees W, x or y in clear.",
                                "Any two workers together could:",
                                "choose three that do not collude.", sep = "\n"),
                 cex = 0.7)
  invisible()
}
