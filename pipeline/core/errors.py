"""The pipeline's own errors: problems with the user's input or setup, never bugs.

A stage prints one of these as a one-line message without a traceback (``pipeline.core.runner``);
every other exception, from this code or a library, is a bug and keeps its traceback. A leaf
module, so that every other module can raise these without importing each other.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A problem whose message names the file, key or setting at fault and says what to do."""


class InputError(PipelineError, ValueError):
    """Bad input: a param, a data file, a model file or an option (also a ``ValueError``)."""


class DataError(InputError):
    """A source data set (its files, layout or annotations) cannot be used as given."""


class MissingInputError(PipelineError, FileNotFoundError):
    """A file or folder the step needs is missing; the message names it and what writes it."""


class SetupError(PipelineError, RuntimeError):
    """The environment cannot do what was asked: a device, a tracking store, a process group."""
