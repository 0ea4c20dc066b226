"""FID's feature network: pytorch-fid's Inception-v3 weights in the Flax twin, and its features.

``load_inception(path)`` reads pytorch-fid's weight file (``pt_inception-2015-12-05-6726825d.pth``,
loaded with ``weights_only=True``) or a safetensors copy of it; ``features(params, images)`` gives
the 2048-d pool3 features of NHWC images in [0, 1] that perflow_jax.fid's statistics are made of.
``FEATURE`` names them in a ``fid.FeatureSpec``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from perflow_jax import weights
from perflow_jax.models.inception import InceptionV3

WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FEATURE = "inception-v3-pool3"  # fid.FeatureSpec.feature of these features

# The file also holds the 1008-way classifier, which pool3 features do not use.
_CLASSIFIER_PREFIX = "fc."


def load_inception(path: str | Path) -> tuple[InceptionV3, dict[str, Any]]:
    """The FID Inception-v3 and its float32 parameters from pytorch-fid's weight file (.pth) or a
    .safetensors copy. Raises weights.WeightsFileError for a missing or unreadable file or one
    that is no state dict, weights.WeightsMismatchError naming a few keys that do not fit."""
    path = Path(path)
    get = f"download pytorch-fid's FID Inception weights from {WEIGHTS_URL} and pass the file's path"
    if not path.is_file():
        raise weights.WeightsFileError(
            f"FID Inception weights {path} {'is a folder' if path.is_dir() else 'do not exist'}: {get}"
        )
    state = weights.SafetensorsStateDict([path]) if path.suffix == ".safetensors" else weights.read_torch_pickle(path)
    model = InceptionV3()
    try:
        params = weights.state_dict_to_params(
            {key: state[key] for key in state if not key.startswith(_CLASSIFIER_PREFIX)},
            model.abstract_params(),
            name="FID Inception-v3",
        )
    except weights.WeightsMismatchError as error:
        found = "; ".join(
            f"{len(keys)} {label} keys ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
            for label, keys in (
                ("missing", error.missing),
                ("unexpected", error.unexpected),
                ("mis-shaped", error.misshaped),
            )
            if keys
        )
        raise weights.WeightsMismatchError(
            f"{path} is not pytorch-fid's Inception-v3: {found}; {get}",
            error.missing,
            error.unexpected,
            error.misshaped,
        ) from None
    return model, weights.cast_params(params, "float32")


@jax.jit
def features(params: dict[str, Any], images: jax.Array) -> jax.Array:
    """pool3 features [B, 2048] float32 of images [B, H, W, 3] float in [0, 1], any H and W (pytorch-fid's
    bilinear resize to 299 x 299 is inside), as pytorch-fid computes them for FID."""
    return InceptionV3().apply({"params": params}, images)
