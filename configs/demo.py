r"""The demo: PeRFlow distillation of the embedded digits teacher on the CPU, in minutes (``make demo``).

The SD1.5 recipe (configs/sd15.py: diff_eps, K=4 windows, S=8 teacher steps, cfg_sync, text
dropout 0.1, AdamW, EMA) on the embedded tiny Stable Diffusion model of handwritten digits
(perflow_jax/demo/, 32 px images, 8x8x4 latents); the overrides are this project's demo setting.
``make demo`` fills the paths:

    python -m perflow_jax.convert --from perflow_jax/demo/digits_teacher --out runs/demo/teacher
    python -m perflow_jax.prepare_data --model runs/demo/teacher --input digits --out runs/demo/data --resolution 32
    python -m perflow_jax.train --config configs/demo.py --workdir runs/demo/work \
        --config.model.path=runs/demo/teacher --config.data.path=runs/demo/data
"""

from pathlib import Path

import ml_collections

from perflow_jax import recipe
from perflow_jax.demo import digits

sd15 = recipe.config_module(Path(__file__).with_name("sd15.py"))


def get_config() -> ml_collections.ConfigDict:
    config = sd15.get_config()
    config.model.compute_dtype = "float32"  # demo: CPUs have no fast bfloat16 matmuls
    config.model.teacher_dtype = "float32"  # demo: frozen teacher and text encoder in float32 too (a few MB)
    config.data.resolution = 32  # demo: the digits VAE makes 8 x 8 latents
    config.data.worker_count = 0  # demo: decode records in the main process
    config.optim.lr = 1e-4  # demo: peak learning rate
    config.train.global_batch_size = 64  # demo: examples per step
    config.train.num_steps = 400  # demo: about 5 minutes on 2 CPU cores
    config.checkpoint.every_steps = 200  # demo: save every this many steps (and at the end)
    config.checkpoint.keep = 2  # demo: keep the last 2 checkpoints
    config.log.every_steps = 25  # demo: a console line and scalars every this many steps
    config.log.eval_every_steps = 200  # demo: a sample grid of the EMA weights every this many steps
    config.log.sample_prompts = tuple(digits.caption(d) for d in range(10))  # demo: one image per digit
    config.log.sample_guidance = 1.0  # demo, no CFG: bench/quality.py compares with the teacher's DDIM at it
    return config
