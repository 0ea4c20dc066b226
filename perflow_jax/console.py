"""Which library logs reach the console: each command's own lines always, Orbax's and JAX's on --verbose.

Orbax (and Grain) log through absl's logger; absl's ``app.run`` (train) shows its INFO lines, about
a hundred per short run. Without --verbose the commands show warnings and errors only, less two
that Orbax gives on every healthy read of a WORKDIR (it is opened read-only on purpose, and an
item's metadata file is optional), and less Orbax's own error tracebacks and asyncio's "exception
was never retrieved" blocks: a save or restore that fails reaches checkpoint.py as an exception,
which the command reports in one line.
"""

from __future__ import annotations

import logging
import os

from absl import logging as absl_logging

VERBOSE_HELP = "also show the INFO logs and routine warnings of Orbax, absl and JAX"
ROUTINE_WARNINGS = ("Given directory is read only", "Metadata file does not exist")
UNRETRIEVED = ("Future exception was never retrieved", "Task exception was never retrieved")


def _not_routine(record: logging.LogRecord) -> bool:
    from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname
    return not (str(record.msg).startswith(ROUTINE_WARNINGS) or (from_orbax and record.levelno >= logging.ERROR))


def _retrieved(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(UNRETRIEVED)


def set_log_levels(verbose: bool) -> None:
    """absl (Orbax, Grain) and JAX loggers at INFO if ``verbose``, else at WARNING less the lines above."""
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)  # under app.run: the root logger
    logging.getLogger("jax").setLevel(logging.INFO if verbose else logging.WARNING)
    for logger, quiet in (logging.getLogger("absl"), _not_routine), (logging.getLogger("asyncio"), _retrieved):
        if verbose:
            logger.removeFilter(quiet)
        else:
            logger.addFilter(quiet)
