"""``python -m perflow_jax.train``: PeRFlow distillation of a Stable Diffusion model.

    python -m perflow_jax.train --config configs/sd15.py --workdir WORKDIR \\
        --config.model.path=CONVERTED_OR_DIFFUSERS_DIR --config.data.path=PREPARED_DATA_DIR

The same command runs on one CPU, one GPU, or every host of a TPU pod (``--config.tpu_pod``; on
GPU clusters set PERFLOW_COORDINATOR, PERFLOW_NUM_PROCESSES and PERFLOW_PROCESS_ID). A WORKDIR
that holds checkpoints resumes from the newest readable one (an unreadable newer one is named and
moved to WORKDIR/broken_checkpoints/). SIGTERM (preemption) or Ctrl-C saves a checkpoint after the
current step and exits (a second Ctrl-C exits at once, without one); in a multi-process run a signal to
any process stops them all after the same step, which JAX's preemption service picks about a second
later (``jax.experimental.multihost_utils.reached_preemption_sync_point``). WORKDIR gets checkpoints/,
metrics.jsonl, TensorBoard events, samples/, jax_cache/ (the compiled step and samplers, which a
resumed run loads: ``--config.compilation_cache_dir``) and, while the run lasts, a lock file naming
it (a second run on the same WORKDIR is refused).

Exit status: 0 the run reached config.train.num_steps; 143 (SIGTERM) or 130 (Ctrl-C) it was
stopped before that, with a checkpoint: run the same command again to resume; 2 refused settings
or WORKDIR, a failed checkpoint save (e.g. a full disk), or a non-finite loss or gradient (the
last checkpoint is kept).

The work is ``perflow_jax.training.train_and_evaluate(config, workdir)``.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from perflow_jax import console, recipe, training


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: settings go in --config.KEY=VALUE")
    console.set_log_levels(_VERBOSE.value)
    try:
        training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except training.Stopped as stopped:
        sys.exit(stopped.exit_code)
    # ValueError: recipe's ConfigError and ResumeError, checkpoint's CheckpointError
    except (training.TrainingError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; a --config.KEY that the config lacks ends the run in one line (exit 2)."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError):  # what config_flags raises for such a key
        message = recipe.unknown_override(argv)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


_CONFIG = config_flags.DEFINE_config_file("config", None, "training config, e.g. configs/sd15.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "folder for checkpoints, metrics.jsonl, TensorBoard and samples")
_VERBOSE = flags.DEFINE_bool("verbose", False, console.VERBOSE_HELP)

if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=_parse_flags)
