# Sourced by demo.sh and .ci/run (bash, `set -euo pipefail`): choose the Python environment that
# knnlm is installed into and run from, and put its bin/ first on PATH, as `source bin/activate` does.
#   - an active virtual environment ($VIRTUAL_ENV) or conda environment ($CONDA_PREFIX): that one;
#   - else the repository's .venv (git-ignored), created with python3 when it is missing. A system
#     Python is never installed into: Debian and Ubuntu refuse it (PEP 668), and may have no pip
#     and no `python`, only `python3`.
# Needs ME (the calling script's name, for messages) and REPO (the repository root). Sets KNNLM_ENV
# (the environment's folder) and KNNLM_ENV_OWN (1 when it is the repository's .venv).

knnlm_say() { echo "$ME: $*" >&2; }
knnlm_die() { echo "$ME: error: $*" >&2; exit 1; }

knnlm_make_venv() {      # knnlm_make_venv DIR: a virtual environment with pip, made with python3
    local dir=$1 py version log
    py=$(command -v python3 || command -v python || true)
    [ -n "$py" ] || knnlm_die "no python3 on PATH: install Python 3.10 or newer (Debian/Ubuntu: sudo apt-get install python3 python3-venv), then rerun"
    version=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || knnlm_die "knnlm needs Python 3.10 or newer; $py is $version"
    knnlm_say "no virtual environment is active: creating one in $dir with $py (Python $version)"
    log=$("$py" -m venv "$dir" 2>&1) || {
        rm -rf "$dir"
        echo "$log" | tail -n 3 >&2
        knnlm_die "could not create a virtual environment with $py. On Debian/Ubuntu install its venv module (sudo apt-get install python3-venv), or activate an environment of your own; then rerun"
    }
}

if [ -n "${VIRTUAL_ENV:-}" ]; then
    KNNLM_ENV=$VIRTUAL_ENV KNNLM_ENV_OWN=0
    knnlm_say "using the active virtual environment $KNNLM_ENV"
elif [ -n "${CONDA_PREFIX:-}" ]; then
    KNNLM_ENV=$CONDA_PREFIX KNNLM_ENV_OWN=0
    knnlm_say "using the active conda environment $KNNLM_ENV"
else
    KNNLM_ENV=$REPO/.venv KNNLM_ENV_OWN=1
    if [ -e "$KNNLM_ENV" ] && ! "$KNNLM_ENV/bin/python" -c '' >/dev/null 2>&1; then
        knnlm_say "$KNNLM_ENV is there but its python does not run (moved, or made by another Python): making it again"
        rm -rf "$KNNLM_ENV"
    fi
    if [ -e "$KNNLM_ENV" ]; then
        knnlm_say "no virtual environment is active: using $KNNLM_ENV"
    else
        knnlm_make_venv "$KNNLM_ENV"
    fi
fi
[ -x "$KNNLM_ENV/bin/python" ] || knnlm_die "$KNNLM_ENV has no bin/python: activate a working environment, then rerun"
if ! "$KNNLM_ENV/bin/python" -m pip --version >/dev/null 2>&1; then    # e.g. a venv made by `uv venv`
    knnlm_say "$KNNLM_ENV has no pip: adding it with ensurepip"
    "$KNNLM_ENV/bin/python" -m ensurepip --upgrade >/dev/null 2>&1 \
        || knnlm_die "$KNNLM_ENV has no pip and ensurepip could not add it: install pip there (uv: uv pip install --python $KNNLM_ENV/bin/python pip), then rerun"
fi
export PATH="$KNNLM_ENV/bin:$PATH"
if [ "$KNNLM_ENV_OWN" = 1 ]; then
    export VIRTUAL_ENV=$KNNLM_ENV
fi
