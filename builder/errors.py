"""The one error base class: every error a user can act on derives from `KnnlmError`.

The `knnlm` command line prints such an error as one line, `knnlm CMD: error: MESSAGE`, and exits
with status 2 (no traceback unless -v). Anything else is a bug and keeps its traceback. Messages
name the flag, key, file or URI to fix.
"""
from __future__ import annotations


class KnnlmError(Exception):
    """A user-facing error: bad input, a refused request, storage or a cluster that failed."""
