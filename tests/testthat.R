library(testthat)
library(privatekeras)

test_check("privatekeras")
