"""Random images in, prepared examples out."""

from pathlib import Path

import numpy as np
from PIL import Image

from perflow_jax import data


def image(seed: int, height: int, width: int) -> Image.Image:
    """A ``height`` x ``width`` RGB image of uniform random pixels drawn with ``seed``."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def read_examples(out: Path) -> dict[str, dict]:
    """Every example of the prepared folder ``out``, decoded, by key."""
    examples = {}
    for path in data.shard_paths(out):
        from array_record.python.array_record_module import ArrayRecordReader

        reader = ArrayRecordReader(str(path))
        for record in reader.read_all():
            example = data.decode_record(record)
            examples[example["key"]] = example
        reader.close()
    return examples
