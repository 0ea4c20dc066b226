r"""PeRFlow distillation of Stable Diffusion 2.1 (768 px, v-prediction teacher): the authors' released recipe.

The SD1.5 recipe (configs/sd15.py) with the values PERFLOW_SPEC.md's "Released recipes" table
changes in its SD2.1 column; where that column is blank the SD1.5 value is kept.

    python -m perflow_jax.train --config configs/sd21.py --workdir DIR \
        --config.model.path=SD21_DIR --config.data.path=DATA_DIR
"""

from pathlib import Path

import ml_collections

from perflow_jax import recipe

sd15 = recipe.config_module(Path(__file__).with_name("sd15.py"))


def get_config() -> ml_collections.ConfigDict:
    config = sd15.get_config()
    config.perflow.parameterization = "velocity"  # recipe, SD2.1 column: the student predicts the window velocity
    config.perflow.teacher_prediction_type = "v_prediction"  # SD2.1 (768)'s UNet predicts v
    config.data.resolution = 768  # recipe, SD2.1 column: image size in pixels
    config.log.sample_steps = 8  # the authors' released SD2.1 demo: 8 sampler steps
    config.log.sample_guidance = 7.5  # the authors' released SD2.1 demo: CFG scale 7.5 at 8 steps
    return config
