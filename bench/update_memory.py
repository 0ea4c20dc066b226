"""Temporaries of the optimizer update alone: which form of gradient clipping makes XLA keep a whole
extra parameter-sized buffer.

The update of ``step.train_step`` (``step.apply_gradients``: global-norm clipping, AdamW, EMA) on SD1.5's (or SDXL's)
parameter shapes, the state donated and the gradients given, lowered from abstract arguments and
compiled for the default device; XLA's memory analysis of each variant is printed:

- ``optax chain``: ``step.make_optimizer`` (optax's clip_by_global_norm, then adamw), and the EMA;
- ``adamw alone`` and ``clip + sgd``: each half without the other (with the EMA);
- ``clip as a product``: g x min(1, c / |g|) (torch's clip_grad_norm_), then adamw, and the EMA.

bench/RESULTS.md ("CPU analysis") holds the figures and what the whole step showed.

    python3 bench/update_memory.py            # SD1.5 shapes (CPU: about a minute)
    python3 bench/update_memory.py --model sdxl
"""

# The imports below must follow the sys.path line before them.
# ruff: noqa: E402
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import optax

from bench.common import memory_analysis
from bench.train_step_spec import SD15, SDXL
from perflow_jax import step
from perflow_jax.models.unet import UNet2DConditionModel, UNetConfig

LR = 8e-5


def clip_as_product(max_norm: float) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        factor = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


VARIANTS = {
    "optax chain": step.make_optimizer(LR),
    "adamw alone": optax.adamw(LR, weight_decay=1e-2),
    "clip + sgd": optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(LR)),
    "clip as a product": optax.chain(clip_as_product(1.0), optax.adamw(LR, weight_decay=1e-2)),
}


def temporaries(params, optimizer: optax.GradientTransformation) -> dict:
    state = jax.eval_shape(functools.partial(step.create_train_state, optimizer=optimizer), params)

    update = functools.partial(step.apply_gradients, optimizer=optimizer, settings=step.PeRFlowSettings())
    memory = memory_analysis(jax.jit(update, donate_argnums=0).lower(state, params).compile())
    return {"arguments_gb": memory["argument_bytes"] / 1e9, "temporaries_gb": memory["temp_bytes"] / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd15", choices=("sd15", "sdxl"))
    args = parser.parse_args()
    spec = {"sd15": SD15, "sdxl": SDXL}[args.model]
    unet = UNet2DConditionModel(UNetConfig.from_dict(spec.unet))
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), unet.abstract_params())
    count = sum(a.size for a in jax.tree.leaves(params))
    print(f"{spec.name}: {count / 1e6:.1f} M parameters ({4 * count / 1e9:.2f} GB in float32), {jax.devices()[0]}")
    for name, optimizer in VARIANTS.items():
        result = temporaries(params, optimizer)
        print(
            f"  {name:18s} arguments {result['arguments_gb']:6.2f} GB, temporaries {result['temporaries_gb']:6.2f} GB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
