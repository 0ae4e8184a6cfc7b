#!/usr/bin/env bash
# One command on a fresh machine: install knnlm (and torch, unless the environment has it) into a
# Python environment and run `knnlm demo`. Offline after the install; about 12 minutes on 2 CPU cores
# the first time, the install included (the small model is cached for the next run).
#   bash demo.sh                  # everything goes to ./knnlm-demo (in the folder you run it from)
#   bash demo.sh --out /tmp/demo  # any `knnlm demo` option
# The environment: the active virtual (or conda) environment if there is one, else .venv in this
# repository, created with python3 (see .ci/env.sh). Afterwards `source .venv/bin/activate` puts
# `knnlm` on your PATH.
# KNNLM_DEMO_STOP=env|install stops after the environment is ready, or after the install.
set -euo pipefail
ME=demo.sh
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PIP_DISABLE_PIP_VERSION_CHECK=1
source "$REPO/.ci/env.sh"
stop=${KNNLM_DEMO_STOP:-}
activate() {
    if [ "$KNNLM_ENV_OWN" = 1 ]; then
        knnlm_say "to use knnlm from your shell afterwards: source ${KNNLM_ENV/#$PWD\//}/bin/activate"
    fi
}
[ "$stop" = env ] && { activate; exit 0; }

if ! python -c "import torch" >/dev/null 2>&1; then
    knnlm_say "installing torch 2.13.0 into $KNNLM_ENV (to pick its build, CPU or your CUDA's, install torch there first: see the README)"
    python -m pip install -q torch==2.13.0
fi
knnlm_say "installing knnlm (editable, from $REPO) and its dependencies into $KNNLM_ENV"
python -m pip install -q -e "$REPO"
[ "$stop" = install ] && { activate; exit 0; }

activate
knnlm_say "running: knnlm demo $*"
rc=0
knnlm demo "$@" || rc=$?
activate
exit $rc
