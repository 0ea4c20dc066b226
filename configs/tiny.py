r"""A tiny PeRFlow run on the CPU: the tests' config (tiny random models, 32 px data).

The SD1.5 recipe (configs/sd15.py) at toy sizes; the overrides are this project's test setting.
The paths are left empty for the caller to fill:

    python -m perflow_jax.train --config configs/tiny.py --workdir /tmp/tiny \
        --config.model.path=TINY_MODEL_DIR --config.data.path=TINY_DATA_DIR
"""

from pathlib import Path

import ml_collections

from perflow_jax import recipe

sd15 = recipe.config_module(Path(__file__).with_name("sd15.py"))


def get_config() -> ml_collections.ConfigDict:
    config = sd15.get_config()
    config.model.compute_dtype = "float32"  # test setting: float32 everywhere, so CPU results compare tightly
    config.model.teacher_dtype = "float32"  # test setting: frozen teacher, VAE and text encoders in float32 too
    config.perflow.solver_steps = 2  # test setting: few teacher steps per window, to be quick
    config.data.resolution = 32  # test setting: the tiny VAE makes 8 x 8 latents
    config.data.worker_count = 0  # test setting: decode records in the main process
    config.optim.lr = 1e-4  # test setting: peak learning rate
    config.train.global_batch_size = 8  # test setting: examples per step
    config.train.num_steps = 6  # test setting: optimizer steps
    config.checkpoint.every_steps = 3  # test setting: save every 3 steps (and at the end)
    config.checkpoint.keep = 2  # test setting: keep the last 2 checkpoints
    config.log.every_steps = 1  # test setting: a console line and scalars every step
    config.log.eval_every_steps = 3  # test setting: a sample grid of the EMA weights every 3 steps
    config.log.sample_prompts = ("a photo of a cat", "a red car")  # test setting: the grid's prompts
    return config
