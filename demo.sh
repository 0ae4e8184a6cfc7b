#!/usr/bin/env bash
# One command on a fresh machine: install knnlm (with the CPU build of torch) and run `knnlm demo`.
# Offline after the install; about 8 minutes on 2 CPU cores the first time (the small model is cached).
#   bash demo.sh                  # everything goes to ./knnlm-demo
#   bash demo.sh --out /tmp/demo  # any `knnlm demo` option
set -euo pipefail
cd "$(dirname "$0")"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q torch==2.13.0        # CPU build; install your CUDA build first to use a GPU
fi
python -m pip install -q -e .
exec knnlm demo "$@"
