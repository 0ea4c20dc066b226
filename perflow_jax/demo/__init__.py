"""The embedded demo: a tiny Stable-Diffusion-architecture teacher trained on handwritten digits.

``TEACHER`` is the committed diffusers pipeline folder (written by
``python -m perflow_jax.demo.train_teacher``); ``DELTA`` the committed PeRFlow delta weights of the
demo student (student minus teacher, flat, with diffusers UNet keys; diff_eps with 4 windows, as
configs/demo.py), the ``runs/demo/torch/delta_weights.safetensors`` that ``make demo`` writes, so
that the student can be sampled without training it first. ``CONTROLNET`` is the committed diffusers
ControlNet of the teacher (written by ``python -m perflow_jax.demo.train_controlnet``), steered by
digit silhouettes (``control``). ``digits`` is the demo's data, ``classifier`` the judge of the quality table.
"""

from pathlib import Path

TEACHER = Path(__file__).parent / "digits_teacher"
DELTA = Path(__file__).parent / "digits_perflow_delta.safetensors"
CONTROLNET = Path(__file__).parent / "digits_controlnet"
