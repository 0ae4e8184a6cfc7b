"""The build's error, and the errors whose message is the whole story (shared by the build's stages)."""
from __future__ import annotations

from builder.config import ConfigError
from builder.corpus import InputError
from builder.errors import KnnlmError
from builder.lease import LeaseError
from builder.manifest import ManifestError
from builder.modelinfo import ModelError
from builder.runtime import unwrap_task_error
from builder.storage import StorageError
from builder.unit import UnitError


class BuildError(KnnlmError, RuntimeError):
    """A build failed for a reason stated in the message; nothing partial was committed."""


# errors whose message is the whole story (KeyLayerError and the config errors are ValueErrors)
USER_ERRORS = (ConfigError, InputError, UnitError, StorageError, ModelError, ManifestError, LeaseError,
               FileNotFoundError, ValueError)


def unwrap(e: BaseException, what: str) -> BuildError:
    """A Ray task's or worker's error as a BuildError naming `what` (runtime.unwrap_task_error)."""
    return unwrap_task_error(e, what, USER_ERRORS, BuildError)
