"""Errors with one-line messages that name the problem and the fix.

The CLI prints ``str(error)`` of these and exits non-zero, so every message must stand alone.
"""


class QATError(Exception):
    """Base class of every error ultralytics-qat raises on purpose; its message is always one printable line."""

    def __init__(self, message: str = "", *args):
        # user input quoted in a message (a key with a newline, a control character) must not break the line
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)), *args)


class QATConfigError(QATError, ValueError):
    """A qat.yaml key, value or override is invalid."""


class QATCheckpointError(QATError, ValueError):
    """A checkpoint is missing, unreadable, or of the wrong kind (e.g. a float model where a QAT one is needed)."""


class QATExportError(QATError, ValueError):
    """A checkpoint cannot be exported as asked (format, opset, missing export extra, unexportable layer)."""


class QuantizerNotInitializedError(QATError, RuntimeError):
    """A quantizer ran forward before its scale was initialised by calibration."""


# Raised by the kernel dispatch (``ULTRALYTICS_QAT_BACKEND=triton`` where Triton cannot run); defined in ``ops``,
# which imports nothing else of ours, and re-exported here so callers find every error in one place.
from .ops.backend import BackendUnavailableError  # noqa: E402,F401

__all__ = ["BackendUnavailableError", "QATCheckpointError", "QATConfigError", "QATError", "QATExportError",
           "QuantizerNotInitializedError"]
