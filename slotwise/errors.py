"""The user-error types: bad input that no retry fixes.

Each message is one line naming the file (and key or line) and what was expected; the CLIs
(slotwise.components._cli.run_cli) print it on stderr and exit 2, and the Prefect flows do not
retry a task that failed with one of USER_ERRORS.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """Bad params: the message is a single line naming file, key and expectation."""


class DataError(ValueError):
    """Malformed or missing input data; the message names the file (and line) and what was expected."""


class ModelSourceError(ValueError):
    """A model source that cannot be resolved; the message says what was expected."""


class CheckpointError(ValueError):
    """A checkpoint (or another artifact made from one) that is unreadable, modified or for another model."""


class SlotTableError(CheckpointError):
    """A slot table that is unreadable or was made for another model."""


class DeltaError(CheckpointError):
    """A sparse delta that is unreadable, modified, or does not belong to the model it is applied to."""


class RegistryError(CheckpointError):
    """An unreadable or inconsistent serving directory (the nightly update's promotion registry)."""


class DivergedError(ValueError):
    """A training run whose loss became NaN or infinite (its params, e.g. a learning rate, are the cause):
    it stops and writes nothing as its result."""


class StorageError(RuntimeError):
    """An artifact could not be read or written; the message is one line naming the URI."""


USER_ERRORS = (ConfigError, DataError, ModelSourceError, CheckpointError, DivergedError, StorageError, FileNotFoundError)
