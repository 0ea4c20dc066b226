r"""PeRFlow distillation of Stable Diffusion XL (1024 px, two text encoders): the authors' released recipe.

The SD1.5 recipe (configs/sd15.py) with the values PERFLOW_SPEC.md's "Released recipes" table
changes in its SDXL column; where that column is blank the SD1.5 value is kept. SD1.5 values that
are also SDXL's: bfloat16 teacher, text encoders and activations (the SDXL column's precision), l2
loss with no weighting (the authors' SDXL script also offers "rcp_win" and an unweighted "huber"),
size ids (1024, 1024, 0, 0, 1024, 1024) for every example (data.sdxl_time_ids "fixed", as the
released PeRFlow-SDXL was trained), 4 sampler steps (released: 4 to 6).

Precision is not all the recipe's: the authors' SDXL script (--mixed_precision bf16) stores the
student's weights in bfloat16 and runs AdamW on them, and its latents and teacher solve are
bfloat16; here the student's master weights, AdamW state and EMA are float32 (so the sharded
state below) and the solve's state is float32. PERFLOW_SPEC.md lists every difference.

    python -m perflow_jax.train --config configs/sdxl.py --workdir DIR \
        --config.model.path=SDXL_DIR --config.data.path=DATA_DIR
"""

from pathlib import Path

import ml_collections

from perflow_jax import recipe

sd15 = recipe.config_module(Path(__file__).with_name("sd15.py"))


def get_config() -> ml_collections.ConfigDict:
    config = sd15.get_config()
    config.model.remat = "full"  # recipe (gradient checkpointing): keep only block inputs for the backward
    config.perflow.parameterization = "ddim_eps"  # recipe, SDXL column: the student predicts the ddim_eps noise
    config.perflow.solver_steps = 10  # recipe, SDXL column: S, the teacher's DDIM steps per window
    config.perflow.teacher_guidance = 7.5  # recipe, SDXL column: the teacher solves with CFG 7.5 (two passes)
    config.perflow.discrete_timesteps = 200  # recipe, SDXL column: M
    config.data.resolution = 1024  # recipe, SDXL column: image size in pixels
    config.optim.lr = 1e-4  # recipe, SDXL column: peak learning rate
    config.train.global_batch_size = 256  # recipe, SDXL column: 8 x 2 per GPU on 16 GPUs
    config.train.gradient_accumulation_steps = 2  # recipe, SDXL column: each device's share in 2 microbatches
    config.mesh.shape = (1, -1)  # state sharded over all devices (student, Adam and EMA: ~41 GB in float32)
    config.log.sample_guidance = 2.0  # the authors' released inference setting: CFG scale 2.0 (1.5 to 2.5)
    return config
