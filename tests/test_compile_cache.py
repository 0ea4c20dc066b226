"""perflow_jax.compile_cache: where the cache lives, and that a second compilation loads from it."""

import jax
import numpy as np

from perflow_jax import compile_cache, recipe


def test_the_training_cache_is_the_workdirs_unless_named_or_turned_off():
    assert compile_cache.training_folder("", "/runs/a") == "/runs/a/jax_cache"
    assert compile_cache.training_folder("gs://bucket/jax_cache", "/runs/a") == "gs://bucket/jax_cache"
    assert compile_cache.training_folder("none", "/runs/a") is None


def test_a_second_compilation_loads_from_the_folder_and_the_settings_come_back(tmp_path):
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    x = np.arange(3.0, dtype=np.float32)
    with compile_cache.cache_in(tmp_path / "cache", min_compile_secs=0):
        with compile_cache.Loads() as first:
            jax.jit(lambda v: v * 2 + 7).lower(x).compile()
        saved = list((tmp_path / "cache").iterdir())
        with compile_cache.Loads() as second:
            jax.jit(lambda v: v * 2 + 7).lower(x).compile()
    assert (first.count, second.count) == (0, 1) and saved
    assert (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs) == before


def test_no_folder_changes_nothing():
    before = jax.config.jax_compilation_cache_dir
    with compile_cache.cache_in(None):
        assert jax.config.jax_compilation_cache_dir == before


def test_a_workdir_saved_before_the_cache_setting_existed_resumes_with_any_cache_folder():
    saved = {"train": {"num_steps": 4}}
    for folder in ("", "none", "gs://bucket/jax_cache"):
        recipe.check_resumable(saved, {"train": {"num_steps": 8}, "compilation_cache_dir": folder})
