"""The top layer: the `knnlm` command line, pipeline files, Ray Jobs submission, the demo."""
