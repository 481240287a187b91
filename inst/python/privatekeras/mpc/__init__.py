"""The three-party computation: fixed-point encoding and sharing (numpy, for owners and
clients) and the private evaluation on the workers (TF Encrypted's ABY3, workers only)."""
