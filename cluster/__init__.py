"""Cluster side: storage URIs, the Ray runtime, the `knnlm` command line."""
