"""The grain input pipeline over prepared ArrayRecord shards: order, resumption, per-process slices."""

from pathlib import Path

import numpy as np
import pytest

from perflow_jax import data

ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZES = (17, 17, 16)
N = sum(SHARD_SIZES)


def write_folder(folder: Path, sdxl: bool = False) -> Path:
    """A prepared data folder of N tiny examples in 3 shards; example i has mean and input_ids filled with i."""
    folder.mkdir(parents=True, exist_ok=True)
    shards, i = [], 0
    for s, count in enumerate(SHARD_SIZES):
        records = []
        for _ in range(count):
            example = {
                "key": f"image-{i}.jpg",
                "caption": f"caption {i}",
                "mean": np.full((2, 2, 4), i, np.float16),
                "logvar": np.full((2, 2, 4), -i, np.float16),
                "input_ids": np.full(77, i, np.int32),
                "original_size": np.array([64 + i, 48], np.int32),
                "crop_top_left": np.array([i, 0], np.int32),
            }
            if sdxl:
                example["input_ids_2"] = np.full(77, 1000 + i, np.int32)
            records.append(data.encode_record(example))
            i += 1
        name = f"shard-{s:05d}{data.SHARD_SUFFIX}"
        data.write_shard(folder / name, records)
        shards.append({"file": name, "count": count})
    data.write_manifest(folder, {"shards": shards, "count": N, "resolution": 16})
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("prepared"))


def indices(batch) -> np.ndarray:
    """The example indices of a batch (mean is filled with the index; float16 holds them exactly)."""
    return batch["mean"][:, 0, 0, 0].astype(int)


def epoch_order(folder, seed, **kwargs) -> np.ndarray:
    iterator = data.create_iterator(folder, batch_size=5, seed=seed, num_epochs=1, **kwargs)
    return np.concatenate([indices(batch) for batch in iterator])


def test_one_epoch_yields_every_example_once_shuffled(folder):
    order = epoch_order(folder, seed=0, process_index=0, process_count=1)
    assert sorted(order) == list(range(N))
    assert list(order) != list(range(N))


def test_same_seed_gives_the_same_order_and_another_seed_another(folder):
    np.testing.assert_array_equal(epoch_order(folder, seed=7), epoch_order(folder, seed=7))
    assert list(epoch_order(folder, seed=7)) != list(epoch_order(folder, seed=8))


def test_without_shuffle_examples_come_in_file_order(folder):
    np.testing.assert_array_equal(epoch_order(folder, seed=0, shuffle=False), np.arange(N))


def test_batches_hold_the_training_fields_of_their_examples(folder):
    batch = next(data.create_iterator(folder, batch_size=4, seed=0))
    i = indices(batch)
    assert sorted(batch) == ["crop_top_left", "input_ids", "logvar", "mean", "original_size"]  # no input_ids_2
    assert batch["mean"].shape == (4, 2, 2, 4) and batch["mean"].dtype == np.float16
    np.testing.assert_array_equal(batch["logvar"], -batch["mean"])
    assert batch["input_ids"].shape == (4, 77) and batch["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(batch["input_ids"], np.repeat(i[:, None], 77, axis=1))
    np.testing.assert_array_equal(batch["original_size"], np.stack([64 + i, np.full(4, 48)], axis=1))
    np.testing.assert_array_equal(batch["crop_top_left"], np.stack([i, np.zeros(4)], axis=1))


def test_sdxl_records_give_input_ids_2(tmp_path):
    batch = next(data.create_iterator(write_folder(tmp_path, sdxl=True), batch_size=3, seed=0))
    np.testing.assert_array_equal(batch["input_ids_2"][:, 0], 1000 + indices(batch))


def test_text_fields_come_when_asked_for(folder):
    batch = next(data.create_iterator(folder, batch_size=3, seed=0, fields=("mean", "caption", "key")))
    assert sorted(batch) == ["caption", "key", "mean"]
    assert list(batch["caption"]) == [f"caption {i}" for i in indices(batch)]


def test_restored_iterator_yields_what_the_uninterrupted_one_yields_next(folder):
    kwargs = dict(batch_size=8, seed=3, num_epochs=None)
    iterator = data.create_iterator(folder, **kwargs)
    seen = np.concatenate([indices(next(iterator)) for _ in range(5)])  # 40 of 50: next, the second epoch
    state = iterator.get_state()
    expected = [indices(next(iterator)) for _ in range(6)]

    restored = data.create_iterator(folder, **kwargs)
    restored.set_state(state)
    np.testing.assert_array_equal([indices(next(restored)) for _ in range(6)], expected)
    assert set(np.concatenate(expected)[:10]) == set(range(N)) - set(seen)  # the batches crossed the epoch end


def test_two_processes_read_disjoint_halves_in_equal_numbers_of_batches(folder):
    per_process = [
        [indices(batch) for batch in data.create_iterator(folder, batch_size=5, seed=0, num_epochs=1, **p)]
        for p in (dict(process_index=0, process_count=2), dict(process_index=1, process_count=2))
    ]
    assert len(per_process[0]) == len(per_process[1]) == N // 2 // 5
    first, second = (set(np.concatenate(batches)) for batches in per_process)
    assert first.isdisjoint(second) and first | second == set(range(N))


# ---- errors: each names the problem and what to do -------------------------------------------


def test_folder_without_manifest_says_to_prepare_the_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no manifest.json: prepare the data first"):
        data.create_iterator(tmp_path, batch_size=2, seed=0)


def test_batch_larger_than_a_process_slice_is_refused(folder):
    with pytest.raises(ValueError, match="per-process batch 26 is larger than the 25 examples each of 2 processes"):
        data.create_iterator(folder, batch_size=26, seed=0, process_index=0, process_count=2)


def test_missing_field_is_named_with_the_fields_present(folder):
    with pytest.raises(ValueError, match="no field 'latents'; they hold caption, crop_top_left, input_ids, key"):
        data.create_iterator(folder, batch_size=2, seed=0, fields=("mean", "latents"))


def test_data_of_another_model_is_refused_naming_both_fingerprints_unless_allowed(folder):
    manifest = {**data.read_manifest(folder), "model_fingerprint": "aaaa"}
    with pytest.raises(ValueError, match=r"fingerprint aaaa\) than the model's \(bbbb\): prepare it again"):
        data.check_for_training(folder, manifest, "bbbb", allow_other_vae=False)
    data.check_for_training(folder, manifest, "bbbb", allow_other_vae=True)
    data.check_for_training(folder, manifest, "aaaa", allow_other_vae=False)


def test_a_folder_without_examples_names_the_skip_reasons(tmp_path):
    data.write_manifest(tmp_path, {"shards": [], "count": 0, "skipped": {"unreadable": 2, "too_small": 0}})
    with pytest.raises(ValueError, match=r"has no examples \(every item was skipped: 2 unreadable\)"):
        data.check_for_training(tmp_path, data.read_manifest(tmp_path), "aaaa", allow_other_vae=False)
    with pytest.raises(ValueError, match=r"has no examples \(every item was skipped: 2 unreadable\)"):
        data.create_iterator(tmp_path, batch_size=1, seed=0)
