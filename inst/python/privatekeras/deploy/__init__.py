"""Deployment: hosts files, certificates, links between workers, and the worker process."""
