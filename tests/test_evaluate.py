"""python -m perflow_jax.evaluate on a tiny PeRFlow run's WORKDIR, with the demo's digit classifier as
the feature network (32 x 32 images), on the CPU."""

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perflow_jax import compile_cache, fid, image_io, sample
from perflow_jax import evaluate as ev
from perflow_jax.demo import classifier, digits
from tests.helpers.pipelines import quiet, tiny_model_and_data, tiny_workdir
from tests.helpers.processes import library_logs

PROMPTS = [digits.caption(label) for label in (0, 1, 2)]
NUM_IMAGES, BATCH_SIZE = 10, 4  # three batches, the last one short
REFERENCES = ("digits:heldout", "teacher:2")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Every evaluation compiles its generators anew; JAX's persistent cache makes the repeats cheap."""
    with compile_cache.cache_in(tmp_path_factory.mktemp("jax_cache"), min_compile_secs=0):
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    _, model, data_dir = tiny_model_and_data(root)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return tiny_workdir(root / "run", model, data_dir)


def options(workdir: Path, out: Path, **changes) -> ev.Options:
    prompts = workdir.parent / "prompts.txt"
    arguments = dict(references=REFERENCES, steps=(4,), num_images=NUM_IMAGES, batch_size=BATCH_SIZE, height=32)
    return ev.Options(model=workdir, prompts=prompts, out=out, **{**arguments, "features": "digits", **changes})


@pytest.fixture(scope="module")
def whole(workdir, tmp_path_factory):
    """An uninterrupted evaluation: (metrics, its --out)."""
    out = tmp_path_factory.mktemp("whole") / "eval"
    return ev.evaluate(options(workdir, out, save_images=True), log=quiet), out


def test_fid_and_accuracy_are_those_of_the_sampled_images(workdir, whole, tmp_path):
    """The same images drawn by `sample` (image j from the seed's noise j), measured by hand, give the
    metrics: the Frechet distance of the classifier's features to the held-out digits' and the accuracy."""
    metrics, out = whole
    prompts = [PROMPTS[j % 3] for j in range(NUM_IMAGES)]
    drawn = sample.sample(sample.Options(workdir, prompts, tmp_path / "grid.png", height=32, width=32), log=quiet)
    pixels = image_io.to_uint8(drawn.images)
    features = classifier.features(pixels)
    real = classifier.features(digits.load("heldout")[0])
    expected = classifier.frechet_distance(features, real)
    entry = metrics["samplers"]["perflow_4"]
    assert entry["images"] == NUM_IMAGES
    assert entry["fid"]["digits:heldout"] == pytest.approx(expected, rel=1e-6)  # float64 statistics
    labels = np.array([j % 3 for j in range(NUM_IMAGES)])
    assert entry["classifier_accuracy"] == pytest.approx(np.mean(classifier.predict(pixels) == labels), abs=1e-12)
    saved = np.stack([np.asarray(Image.open(out / "images/perflow_4" / f"{j:05d}.png")) for j in range(NUM_IMAGES)])
    np.testing.assert_array_equal(saved, pixels)
    assert json.loads((out / "metrics.json").read_text())["samplers"] == metrics["samplers"]


def test_the_teacher_reference_is_its_ddim_images_from_other_noise(whole):
    """teacher:2 is the teacher's 2-step DDIM from seed + 1; its statistics are saved for reuse."""
    metrics, out = whole
    reference = fid.load_reference(
        out / "references/teacher_ddim_2.npz", fid.FeatureSpec("digits-mlp-64", 32, "center-crop")
    )
    assert reference.count == NUM_IMAGES
    assert metrics["samplers"]["perflow_4"]["fid"]["teacher:2"] > 0
    assert metrics["settings"]["teacher_guidance"] == sample.TEACHER_GUIDANCE


def test_an_interrupted_evaluation_resumes_to_the_same_figures(workdir, whole, tmp_path, monkeypatch):
    """Stopped after two of three batches, then run again: every image counted once, the same metrics."""
    draw = ev.generated_batches

    def two_batches(*args):
        for index, batch in enumerate(draw(*args)):
            if index == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(ev, "generated_batches", two_batches)
    out = tmp_path / "eval"
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(options(workdir, out), log=quiet)
    stopped = ev.Progress.load(out / "progress/perflow_4.npz", 64)
    assert (stopped.batches, stopped.stats.count) == (2, 2 * BATCH_SIZE)
    monkeypatch.setattr(ev, "generated_batches", draw)
    resumed = ev.evaluate(options(workdir, out), log=quiet)
    for name, entry in whole[0]["samplers"].items():
        again = resumed["samplers"][name]
        assert again["images"] == entry["images"] == NUM_IMAGES
        for reference, value in entry["fid"].items():
            assert again["fid"][reference] == pytest.approx(value, rel=1e-9)
        assert again["classifier_accuracy"] == entry["classifier_accuracy"]


def test_an_out_with_other_settings_is_refused_unless_overwrite(workdir, whole, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    shutil.copytree(whole[1], out)
    with pytest.raises(ev.EvaluateError, match="--out .* other settings \\(num_images: 10 then, 12 now;.*--overwrite"):
        ev.evaluate(options(workdir, out, num_images=12), log=quiet)
    # a resumed run would write the PNGs of its own batches only
    with pytest.raises(ev.EvaluateError, match="other settings \\(save_images: True then, False now"):
        ev.evaluate(options(workdir, out, save_images=False), log=quiet)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "digit_features", stop)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(options(workdir, out, num_images=12, overwrite=True), log=quiet)
    assert json.loads((out / "settings.json").read_text())["num_images"] == 12
    assert not (out / "progress").exists() and not (out / "metrics.json").exists()


def test_reference_statistics_of_another_image_size_are_refused_before_sampling(workdir, tmp_path):
    stats = fid.FeatureStats(64)
    stats.add(np.random.default_rng(0).standard_normal((100, 64)))
    fid.save_reference(tmp_path / "other.npz", stats, fid.FeatureSpec("digits-mlp-64", 64, "center-crop"))
    with pytest.raises(ev.EvaluateError, match="made with image_size 64 but this evaluation uses image_size 32"):
        ev.evaluate(options(workdir, tmp_path / "eval", references=(str(tmp_path / "other.npz"),)), log=quiet)
    assert not (tmp_path / "eval").exists()


def test_corrupt_images_of_a_reference_folder_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = digits.load("heldout")[0][:5]
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{index}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    logged = []
    o = ev.Options(model=tmp_path, prompts=tmp_path, references=(str(folder),), out=tmp_path / "eval", batch_size=4)
    spec = fid.FeatureSpec("digits-mlp-64", 32, "center-crop")
    reference = ev._reference_stats(str(folder), o, spec, ev.digit_features(), 32, logged.append)
    assert reference.count == 5
    np.testing.assert_allclose(reference.mu, classifier.features(pixels).mean(axis=0), rtol=1e-12)
    assert any("1 images skipped (1 unreadable)" in line for line in logged)


def test_coco_captions_give_distinct_images_drawn_with_the_seed(tmp_path):
    annotations = [{"image_id": i, "caption": f"image {i} caption {c}"} for i in range(6) for c in range(2)]
    (tmp_path / "captions.json").write_text(json.dumps({"annotations": annotations}))
    drawn = ev.read_prompts(tmp_path / "captions.json", 4, seed=0)
    assert len({p.split(" caption")[0] for p in drawn}) == 4
    assert drawn == ev.read_prompts(tmp_path / "captions.json", 4, seed=0)
    assert drawn != ev.read_prompts(tmp_path / "captions.json", 4, seed=1)
    with pytest.raises(ev.EvaluateError, match="captions of 6 images, fewer than --num-images 7"):
        ev.read_prompts(tmp_path / "captions.json", 7, seed=0)


def test_missing_inception_weights_say_where_to_get_them(workdir, tmp_path, capsys):
    argv = ["--model", str(workdir), "--prompts", str(workdir.parent / "prompts.txt"), "--reference", "teacher:2"]
    assert ev.main([*argv, "--out", str(tmp_path / "eval")]) == 2
    error = capsys.readouterr().err
    assert "--inception is missing" in error and "pt_inception-2015-12-05-6726825d.pth" in error


def test_clip_score_of_the_evaluation_is_clip_scores_formula(tmp_path):
    """Per-image 100 x cosines summed by the evaluation, then clipped, equal clip_score.clip_score of the
    same towers on the same images and captions (batch of 3 on the mesh, padded as the devices need)."""
    import jax
    import jax.numpy as jnp

    from perflow_jax import clip_score as cs
    from perflow_jax import sharding
    from tests.helpers.clip import images, save_tiny_clip

    save_tiny_clip(tmp_path)
    agreement = ev.clip_agreement(tmp_path, sharding.make_mesh((-1, 1)))
    pictures, captions = images((3, 48, 48)), ["a 3", "the digit 7", "zero"]
    actual = agreement.final(float(np.mean(agreement.score(pictures, captions))))
    clip = cs.load_clip(tmp_path)
    pixels = cs.preprocess(jnp.asarray(pictures), clip.vision.config.image_size)
    image_embeds = jax.jit(clip.vision.apply)({"params": clip.vision_params}, pixels).image_embeds
    text_embeds = jax.jit(clip.text.apply)(
        {"params": clip.text_params}, jnp.asarray(clip.tokenize(captions))
    ).text_embeds
    assert actual == pytest.approx(float(cs.clip_score(image_embeds, text_embeds)), rel=1e-5, abs=1e-4)
    assert agreement.final(-3.0) == 0.0  # torchmetrics clips the mean at 0


def test_cli_on_two_devices_gives_the_figures_of_one_device(workdir, whole, tmp_path):
    """The command on two CPU devices (each batch of 4 split 2 + 2, the last one padded): the same images
    up to float32 recompilation, so the same figures to well within their own precision."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    command = [
        sys.executable, "-m", "perflow_jax.evaluate", "--model", str(workdir), "--prompts",
        str(workdir.parent / "prompts.txt"), "--reference", *REFERENCES, "--features", "digits", "--height", "32",
        "--num-images", str(NUM_IMAGES), "--batch-size", str(BATCH_SIZE), "--out", str(tmp_path / "eval"),
        "--compilation-cache", str(tmp_path / "jax_cache"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "jax_cache").iterdir())  # the compiled generators, for the next command
    assert library_logs(result.stderr) == []
    assert "perflow_4: FID" in result.stdout
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert metrics["machine"].startswith(f"{platform.machine()}, 2 x ")
    entry, expected = metrics["samplers"]["perflow_4"], whole[0]["samplers"]["perflow_4"]
    assert entry["images"] == NUM_IMAGES
    for reference, value in expected["fid"].items():
        assert entry["fid"][reference] == pytest.approx(value, rel=1e-3)
