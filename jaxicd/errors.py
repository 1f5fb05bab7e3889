"""Expected failures: bad input, bad config, missing files, a refused resume.

``jaxicd.main`` prints the message of an expected failure alone on stderr (no traceback; the
message names the file, line or config key) and exits with status 2; ``--verbose`` shows the
traceback too. Any other exception is a bug and keeps its traceback (status 1).

New code raises `UserError` (or `InputError` / `ConfigError`, which are also ``ValueError`` so
callers that catch ``ValueError`` keep working); the error classes the readers, loaders and the
checkpointer already raise count as expected too (`is_expected`).
"""

from __future__ import annotations

import sys

EXIT_STATUS = 2

# Classes defined elsewhere, looked up only in modules already imported (an exception of a module
# that was never imported cannot have been raised, and importing them would start JAX).
_EXPECTED_ELSEWHERE = (
    ("jaxicd.data.records", "RecordError"),
    ("jaxicd.train.checkpoint", "CheckpointMismatchError"),
    ("jaxicd.model.tokenizer", "TokenizerError"),
    ("jaxicd.model.gguf_io", "GgufFormatError"),
    ("jaxicd.model.weights", "WeightsError"),
    ("jaxicd.model.export", "ExportError"),
)


class UserError(Exception):
  """An expected failure; its message is all the user needs."""


class InputError(UserError, ValueError):
  """Bad input files: unreadable, wrong format or suffix, a note too long, ..."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work (the message names the key)."""


def is_expected(exc: BaseException) -> bool:
  # Missing or unwritable files: the OSError names the path.
  if isinstance(exc, (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                      PermissionError)):
    return True
  for module, name in _EXPECTED_ELSEWHERE:
    cls = getattr(sys.modules.get(module), name, None)
    if cls is not None and isinstance(exc, cls):
      return True
  return False


def message(exc: BaseException) -> str:
  """One clear message: the exception's text (OSErrors without one get their path)."""
  text = str(exc).strip()
  if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
    text = f"{exc.filename}: {exc.strerror or text}"
  return text or type(exc).__name__
