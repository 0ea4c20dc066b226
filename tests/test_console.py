"""Which library logs the commands show: Orbax's, absl's and JAX's INFO lines and routine warnings on --verbose only.

That a default run shows none is asserted on the runs of the command tests (tests.helpers.processes.library_logs).
"""

import importlib
import logging
import os

import pytest
from absl import flags
from absl import logging as absl_logging

from perflow_jax import console


@pytest.fixture
def absl_logger():
    """The logger Orbax writes to; its level and filters, absl's verbosity and JAX's level restored afterwards."""
    absl, jax_logger, asyncio = logging.getLogger("absl"), logging.getLogger("jax"), logging.getLogger("asyncio")
    saved = absl_logging.get_verbosity(), absl.level, list(absl.filters), jax_logger.level, list(asyncio.filters)
    yield absl
    absl_logging.set_verbosity(saved[0])
    absl.setLevel(saved[1])
    absl.filters[:] = saved[2]
    jax_logger.setLevel(saved[3])
    asyncio.filters[:] = saved[4]


def orbax_warning(message: str, level: int = logging.WARNING, path: str = "orbax.py") -> logging.LogRecord:
    return logging.getLogger("absl").makeRecord("absl", level, path, 1, message, ("/run",), None)


ORBAX_SAVE = f"{os.sep}site-packages{os.sep}orbax{os.sep}checkpoint{os.sep}async_checkpointer.py"


def test_orbaxs_error_tracebacks_and_unretrieved_futures_go_by_default_as_checkpoint_names_the_failure(absl_logger):
    failed = orbax_warning("Failed to run %s Handler Commit operations", logging.ERROR, ORBAX_SAVE)
    unretrieved = logging.getLogger("asyncio").makeRecord(
        "asyncio", logging.ERROR, "base_events.py", 1, "Future exception was never retrieved", (), None
    )
    console.set_log_levels(False)
    assert not absl_logger.filter(failed) and not logging.getLogger("asyncio").filter(unretrieved)
    assert absl_logger.filter(orbax_warning("disk trouble in %s", logging.ERROR, "elsewhere.py"))  # not Orbax's: shown
    console.set_log_levels(True)
    assert absl_logger.filter(failed) and logging.getLogger("asyncio").filter(unretrieved)


def test_by_default_warnings_pass_but_not_info_nor_orbaxs_routine_warnings(absl_logger):
    console.set_log_levels(False)
    assert absl_logger.getEffectiveLevel() == logging.getLogger("jax").getEffectiveLevel() == logging.WARNING
    assert not absl_logger.filter(orbax_warning("Given directory is read only=%s"))
    assert not absl_logger.filter(orbax_warning("Metadata file does not exist: %s/_CHECKPOINT_METADATA"))
    assert absl_logger.filter(orbax_warning("Checkpoint %s is not finalized"))


def test_verbose_shows_info_and_the_routine_warnings(absl_logger):
    console.set_log_levels(False)
    console.set_log_levels(True)
    assert absl_logger.getEffectiveLevel() == logging.getLogger("jax").getEffectiveLevel() == logging.INFO
    assert absl_logger.filter(orbax_warning("Given directory is read only=%s"))


@pytest.mark.parametrize("command", ["convert", "prepare_data", "sample", "export"])
def test_each_command_takes_verbose(command, capsys):
    with pytest.raises(SystemExit) as exit:
        importlib.import_module(f"perflow_jax.{command}").main(["--help"])
    assert exit.value.code == 0 and f"--verbose {console.VERBOSE_HELP}" in " ".join(capsys.readouterr().out.split())


def test_train_takes_verbose():
    importlib.import_module("perflow_jax.train")
    assert flags.FLAGS["verbose"].help == console.VERBOSE_HELP and flags.FLAGS["verbose"].default is False
