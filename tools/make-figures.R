# Writes the README's pictures (man/figures/) from the package's own drawing code:
#   Rscript tools/make-figures.R        (from the repository's root; `make figures`)
# The vignettes draw the same picture when they are built.
suppressPackageStartupMessages(pkgload_ok <- requireNamespace("pkgload", quietly = TRUE))
if (pkgload_ok) {
  pkgload::load_all(".", export_all = FALSE, quiet = TRUE)
  draw <- getFromNamespace("draw_parties", "privatekeras")
} else {
  source(file.path("R", "figures.R"))
  draw <- draw_parties
}
dir.create(file.path("man", "figures"), showWarnings = FALSE, recursive = TRUE)
svg(file.path("man", "figures", "parties.svg"), width = 9, height = 5.8)
draw()
invisible(dev.off())
cat("wrote man/figures/parties.svg\n")
