"""The errors a user is meant to meet: each says what was wrong, naming the key, file or stage.

``hatchling run`` prints a :class:`HatchlingError` as one line, with no traceback: bad params, a
missing or malformed input, a stage that cannot produce a usable result. Anything else is a bug
or a fault of the environment, and is printed with its traceback so that it can be found.

Nothing here imports from the rest of the package, so every layer can raise these.
"""

from __future__ import annotations

import types


class HatchlingError(Exception):
    """An expected failure, fully described by its message."""


class ConfigError(HatchlingError, ValueError):
    """A params file, override or combination of settings that does not fit the schema."""


class InputError(HatchlingError, ValueError):
    """An input file (shard, token file, checkpoint, eval set, chat data) that is malformed or corrupt."""


class MissingInputError(InputError, FileNotFoundError):
    """An input that is not there (usually: the stage that makes it has not run)."""


class StageError(HatchlingError, RuntimeError):
    """A stage that cannot run, or that finished without a usable result."""


class DiskFullError(HatchlingError, OSError):
    """An output that could not be written because the disk (or the file-size limit, or the quota)
    was full: ENOSPC, EFBIG or EDQUOT, in ``errno``. The message names the output; the previous
    version of it is left as it was and no partial file remains (hatchling/io.py's atomic_path)."""


class BrokenEnvironment(StageError):
    """A stage stopped because the installed environment is broken, not its input: a package that
    fails to import, or one whose API is not the one the code was written against. Raised where the
    fault was met in another process (the crawl's), its message carries that process's traceback.
    Rerunning cannot help (orchestrators do not retry it); repairing the environment can."""


def environment_fault(error: BaseException) -> bool:
    """True for an error that says the environment is broken: a failed import, an attribute missing
    from a module (installed versions that do not fit together), or a BrokenEnvironment.
    An AttributeError on any other object is a bug in the code, or bad input, and stays that."""
    return isinstance(error, (ImportError, BrokenEnvironment)) or (
        isinstance(error, AttributeError) and isinstance(error.obj, types.ModuleType))
