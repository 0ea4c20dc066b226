"""python -m perflow_jax.prepare_data: sources, skip reasons, stored values, resume, processes."""

import functools
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from transformers import CLIPTokenizer

from perflow_jax import data, models, prepare_data, sharding, weights
from perflow_jax.convert import convert
from perflow_jax.prepare_data import (
    MAX_PIXELS,
    SKIP_REASONS,
    STATE_FILE,
    Item,
    PrepareError,
    center_crop,
    decoder,
    main,
    prepare,
)
from tests.helpers.data import image, read_examples
from tests.helpers.pipelines import tiny_pipeline
from tests.helpers.processes import library_logs, run_joined_processes

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 32  # the tiny VAE downsamples by 4: 8x8 latents


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A converted tiny random SD pipeline."""
    folder = tmp_path_factory.mktemp("model")
    tiny_pipeline(folder / "sources").save_pretrained(folder / "diffusers")
    convert(folder / "diffusers", folder / "converted", log=lambda _: None)
    return folder / "converted"


def png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """9 good images (various sizes) with .txt captions, and one item of each skip reason."""
    folder = tmp_path_factory.mktemp("images")
    for i in range(9):
        image(i, 40 + 3 * i, 64 - 2 * i).save(folder / f"good{i}.png")
        (folder / f"good{i}.txt").write_text(f"a photo number {i}\n")
    (folder / "unreadable.jpg").write_bytes(b"this is not an image")
    (folder / "unreadable.txt").write_text("caption")
    (folder / "corrupt.png").write_bytes(png_bytes(image(20, 48, 48))[:200])
    (folder / "corrupt.txt").write_text("caption")
    image(21, 12, 40).save(folder / "small.png")
    (folder / "small.txt").write_text("caption")
    image(22, 48, 48).save(folder / "uncaptioned.png")
    return folder


@pytest.fixture(scope="module")
def prepared(model, image_folder, tmp_path_factory):
    """(manifest, folder) of image_folder prepared in 4-item shards, decoded in this process."""
    out = tmp_path_factory.mktemp("prepared") / "out"
    return prepare(model, str(image_folder), out, resolution=RESOLUTION, shard_size=4, progress=False), out


def test_folder_source_counts_skips_by_reason(prepared):
    manifest, out = prepared
    assert manifest["count"] == 9 and manifest["input_items"] == 13
    assert manifest["skipped"] == {
        **dict.fromkeys(SKIP_REASONS, 0),
        **{"unreadable": 1, "corrupt": 1, "too_small": 1, "no_caption": 1},
    }
    assert manifest["latent_shape"] == [8, 8, 4] and manifest["schema_version"] == data.SCHEMA_VERSION
    assert sum(shard["count"] for shard in manifest["shards"]) == 9
    assert sorted(read_examples(out)) == [f"good{i}.png" for i in range(9)]


def test_records_hold_the_vae_moments_of_the_crop_and_the_token_ids(model, image_folder, tmp_path):
    prepare(model, str(image_folder), tmp_path / "out", resolution=RESOLUTION, latent_dtype="float32", progress=False)
    example = read_examples(tmp_path / "out")["good3.png"]
    source = Image.open(image_folder / "good3.png")
    pixels, original, crop = center_crop(source, RESOLUTION)
    assert tuple(example["original_size"]) == (49, 58) == original and tuple(example["crop_top_left"]) == crop
    class_name, config, params = weights.read_component(model, "vae")
    vae = models.from_config(class_name, config)
    mean, logvar = vae.apply({"params": params}, pixels[None], method="encode")
    # The same network on the same crop; only the batch it ran in differs: float32 rounding.
    np.testing.assert_allclose(example["mean"], mean[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(example["logvar"], logvar[0], rtol=1e-5, atol=1e-6)
    assert example["caption"] == "a photo number 3"
    tokenizer = CLIPTokenizer.from_pretrained(str(model / "tokenizer"))
    expected_ids = tokenizer("a photo number 3", padding="max_length", max_length=77, truncation=True)["input_ids"]
    np.testing.assert_array_equal(example["input_ids"], expected_ids)


def test_center_crop_keeps_the_middle_of_the_longer_side():
    gradient = np.tile(np.arange(100, dtype=np.uint8)[None, :, None], (50, 1, 3))  # 50 x 100, brightness = column
    pixels, original, (top, left) = center_crop(Image.fromarray(gradient), 32)
    assert original == (50, 100) and top == 0 and left == 16  # resized to 32 x 64, 16 columns cut each side
    assert abs(pixels[:, 16].mean() - ((50 / 127.5) - 1)) < 0.05  # the middle column is the original's middle


def test_float16_latents_are_the_rounded_float32_ones(model, image_folder, tmp_path):
    prepare(model, str(image_folder), tmp_path / "a", resolution=RESOLUTION, latent_dtype="float32", progress=False)
    prepare(model, str(image_folder), tmp_path / "b", resolution=RESOLUTION, latent_dtype="float16", progress=False)
    a, b = read_examples(tmp_path / "a")["good0.png"], read_examples(tmp_path / "b")["good0.png"]
    assert b["mean"].dtype == np.float16
    np.testing.assert_array_equal(b["mean"], a["mean"].astype(np.float16))


def test_metadata_jsonl_captions(model, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i in range(3):
        image(i, 40, 40).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"caption {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows[:2]) + "\n")  # the third has none
    manifest = prepare(model, str(folder), tmp_path / "out", resolution=RESOLUTION, progress=False)
    assert manifest["count"] == 2 and manifest["skipped"]["no_caption"] == 1
    assert read_examples(tmp_path / "out")["1.png"]["caption"] == "caption 1"


def add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but holds no pixel data: PIL reads the size on open."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = struct.pack(">I", 0) + b"IDAT" + struct.pack(">I", zlib.crc32(b"IDAT"))
    return b"\x89PNG\r\n\x1a\n" + chunk + idat


def test_webdataset_tars(model, tmp_path):
    for shard in range(2):
        with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as tar:
            for i in range(3):
                key = f"{shard:05d}{i:04d}"
                add(tar, f"{key}.jpg", png_bytes(image(10 * shard + i, 48, 40)))
                if i == 2:
                    add(tar, f"{key}.json", json.dumps({"caption": f"json caption {key}"}).encode())
                else:
                    add(tar, f"{key}.txt", f"text caption {key}".encode())
        with tarfile.open(tmp_path / f"{shard:05d}.tar", "a") as tar:
            add(tar, f"{shard:05d}9999.txt", b"caption without image")
    manifest = prepare(model, str(tmp_path / "*.tar"), tmp_path / "out", resolution=RESOLUTION, progress=False)
    assert manifest["count"] == 6 and manifest["skipped"]["unreadable"] == 2
    examples = read_examples(tmp_path / "out")
    assert examples["00001.tar/000010002"]["caption"] == "json caption 000010002"
    assert examples["00000.tar/000000000"]["caption"] == "text caption 000000000"


def test_bad_tars_and_tar_metadata_are_skipped_counted_and_named(model, tmp_path, capsys):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for key, caption_json in [("a", b'{"caption": "caf\xe9"}'), ("b", b"{not json"), ("c", b'{"caption": [1]}')]:
            add(tar, f"{key}.png", png_bytes(image(ord(key), 40, 40)))
            add(tar, f"{key}.json", caption_json)
    with tarfile.open(tmp_path / "00001.tar", "w") as tar:
        for key in ("d", "e"):
            add(tar, f"{key}.png", png_bytes(image(ord(key), 40, 40)))
            add(tar, f"{key}.txt", f"caption {key}".encode())
    whole = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(whole[: whole.index(b"caption d") + 1200])  # cut inside e.png's data
    (tmp_path / "00004.tar").write_bytes(whole[: whole.index(b"caption d") + 600])  # cut inside e.png's header
    (tmp_path / "00002.tar").write_bytes(b"not a tar at all")
    with tarfile.open(tmp_path / "00003.tar", "w") as tar:
        add(tar, "f.png", png_bytes(image(ord("f"), 40, 40)))
        add(tar, "f.txt", b"caption f")
    manifest = prepare(model, str(tmp_path / "*.tar"), tmp_path / "out", resolution=RESOLUTION, progress=False)
    assert manifest["skipped"] == {**dict.fromkeys(SKIP_REASONS, 0), "bad_metadata": 1, "bad_caption": 1, "bad_tar": 3}
    examples = read_examples(tmp_path / "out")
    assert sorted(examples) == ["00000.tar/a", "00001.tar/d", "00003.tar/f", "00004.tar/d"]
    assert examples["00000.tar/a"]["caption"] == "caf\ufffd"  # not UTF-8: replaced, as in .txt captions
    warnings = capsys.readouterr().err
    assert all(f"{n:05d}.tar: not a readable tar" in warnings for n in (1, 2, 4))


def test_bad_metadata_captions_and_oversized_images_are_skipped_and_counted(model, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("kept", "broken_line", "number_caption", "large"):
        image(len(name), *((64, 64) if name == "large" else (40, 40))).save(folder / f"{name}.png")
    (folder / "bomb.png").write_bytes(png_header_only(20000, 20000))  # over PIL's decompression-bomb limit
    lines = [
        b'{"file_name": "kept.png", "text": "caf\xe9"}',
        b'{"file_name": "broken_line.png", "text": "unterminated',
        b'{"file_name": "number_caption.png", "text": 5}',
        b'{"file_name": "large.png", "text": "large"}',
        b'{"file_name": "bomb.png", "text": "bomb"}',
    ]
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    manifest = prepare(model, str(folder), tmp_path / "out", resolution=RESOLUTION, max_pixels=3000, progress=False)
    assert manifest["count"] == 1 and manifest["max_pixels"] == 3000  # large.png: 64 x 64 > 3000 pixels
    assert manifest["skipped"] == {**dict.fromkeys(SKIP_REASONS, 0), "no_caption": 1, "bad_caption": 1, "too_large": 2}
    assert read_examples(tmp_path / "out")["kept.png"]["caption"] == "caf\ufffd"
    assert "metadata.jsonl: 1 lines are not JSON objects (line 2)" in capsys.readouterr().err


def test_metadata_csv_that_is_not_utf8_is_read_as_txt_captions_are(model, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    image(0, 40, 40).save(folder / "0.png")
    (folder / "metadata.csv").write_bytes(b"file_name,text\n0.png,caf\xe9 au lait\n")  # Latin-1
    prepare(model, str(folder), tmp_path / "out", resolution=RESOLUTION, progress=False)
    assert read_examples(tmp_path / "out")["0.png"]["caption"] == "caf\ufffd au lait"


def test_sixteen_bit_greyscale_is_scaled_to_eight_bits():
    levels = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(levels).save(buffer, format="PNG")
    source = Image.open(buffer)
    assert source.mode == "I;16"
    pixels, _, _ = center_crop(source, 32)  # the same size: no resampling
    expected = np.round(levels * (255 / 65535)) / 127.5 - 1.0
    np.testing.assert_allclose(pixels, np.repeat(expected[..., None], 3, axis=-1), atol=1e-6)


def test_resume_with_a_changed_input_is_refused_naming_the_changes(model, image_folder, tmp_path):
    folder = shutil.copytree(image_folder, tmp_path / "images")
    out = tmp_path / "out"
    assert prepare(model, str(folder), out, resolution=RESOLUTION, shard_size=3, max_items=3, progress=False) is None
    image(30, 40, 40).save(folder / "added.png")
    (folder / "good1.png").unlink()
    (folder / "good2.txt").write_text("another caption, of another length\n")
    changes = r"1 added \(added.png\); 1 removed \(good1.png\); 1 modified \(good2.txt\)"
    with pytest.raises(PrepareError, match=rf"input changed since .*out was started \({changes}\): restore the input"):
        prepare(model, str(folder), out, resolution=RESOLUTION, shard_size=3, progress=False)


def test_no_examples_is_an_error_naming_the_skip_reasons(model, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        image(i, 40, 40).save(folder / f"{i}.png")  # no captions
    with pytest.raises(PrepareError, match=r"no examples \(every item was skipped: 2 no_caption\)"):
        prepare(model, str(folder), tmp_path / "out", resolution=RESOLUTION, progress=False)
    with pytest.raises(ValueError, match=r"has no examples \(every item was skipped: 2 no_caption\)"):
        data.create_iterator(tmp_path / "out", batch_size=1, seed=0)


@pytest.mark.parametrize("flag", ["--resolution", "--shard-size", "--batch-size", "--max-pixels"])
@pytest.mark.parametrize("value", ["0", "-8"])
def test_sizes_below_one_are_argument_errors(flag, value, tmp_path, capsys):
    argv = ["--model", str(tmp_path), "--input", str(tmp_path), "--out", str(tmp_path / "out"), "--resolution", "32"]
    with pytest.raises(SystemExit) as exit_:
        main(argv + [flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: '{value}' is not a whole number above 0" in capsys.readouterr().err


def test_tfds_source(model, tmp_path):
    import tensorflow_datasets as tfds

    class TinyCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text()}
            )
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(5):  # images as encoded bytes: TFDS needs no TensorFlow for those
                yield i, {"image": io.BytesIO(png_bytes(image(i, 40, 48))), "caption": f"tfds caption {i}"}

    TinyCaptions(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    manifest = prepare(
        model,
        "tfds:tiny_captions:train",
        tmp_path / "out",
        resolution=RESOLUTION,
        tfds_data_dir=str(tmp_path / "tfds"),
        progress=False,
    )
    assert manifest["count"] == 5
    captions = sorted(example["caption"] for example in read_examples(tmp_path / "out").values())
    assert captions == [f"tfds caption {i}" for i in range(5)]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*"))}


def test_interrupted_run_resumes_to_the_same_shards(model, image_folder, tmp_path):
    whole = prepare(model, str(image_folder), tmp_path / "whole", resolution=RESOLUTION, shard_size=3, progress=False)
    out = tmp_path / "resumed"
    assert (
        prepare(model, str(image_folder), out, resolution=RESOLUTION, shard_size=3, max_items=6, progress=False) is None
    )
    assert not (out / data.MANIFEST).exists() and len(list(out.glob("shard-*.json"))) == 2
    (out / "shard-00002.array_record.partial").write_bytes(b"half a shard")  # killed while writing
    resumed = prepare(model, str(image_folder), out, resolution=RESOLUTION, shard_size=3, progress=False)
    assert resumed == whole
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")
    assert not list(out.glob("*.partial"))


def test_resume_with_other_settings_is_refused(model, image_folder, tmp_path):
    prepare(
        model, str(image_folder), tmp_path / "out", resolution=RESOLUTION, shard_size=3, max_items=3, progress=False
    )
    with pytest.raises(PrepareError, match="prepared with other settings .*resolution: 32 then, 64 now"):
        prepare(model, str(image_folder), tmp_path / "out", resolution=64, shard_size=3, progress=False)


def test_a_settings_file_that_is_not_json_is_named_with_its_line_and_column(model, image_folder, tmp_path):
    out = tmp_path / "out"
    prepare(model, str(image_folder), out, resolution=RESOLUTION, shard_size=3, max_items=3, progress=False)
    (out / STATE_FILE).write_text('{"resolution": 32,\n  "shard_size": 3')  # cut off
    with pytest.raises(weights.WeightsFileError, match=f"{out / STATE_FILE} is not valid JSON: .* line 2"):
        prepare(model, str(image_folder), out, resolution=RESOLUTION, shard_size=3, progress=False)


def test_two_processes_prepare_disjoint_shards_and_one_manifest(model, image_folder, tmp_path):
    single = prepare(model, str(image_folder), tmp_path / "single", resolution=RESOLUTION, shard_size=3, progress=False)
    out = tmp_path / "pod"
    pod = dict(resolution=RESOLUTION, shard_size=3, process_count=2, progress=False)
    first = prepare(model, str(image_folder), out, process_index=0, **pod)
    assert first is None  # process 1's shards are missing
    assert sorted(p.name for p in out.glob("shard-*.json")) == [
        "shard-00000.json",
        "shard-00002.json",
        "shard-00004.json",
    ]
    second = prepare(model, str(image_folder), out, process_index=1, **pod)
    assert second["count"] == single["count"] and shard_bytes(out) == shard_bytes(tmp_path / "single")

    # The same as two joined processes (jax.distributed), each writing its own shards: one data set.
    command = [sys.executable, "-m", "perflow_jax.prepare_data", "--model", str(model), "--input", str(image_folder)]
    command += ["--out", str(tmp_path / "joined"), "--resolution", str(RESOLUTION), "--shard-size", "3"]
    outputs = run_joined_processes(command + ["--decode-workers", "0"], 2, timeout=600)
    assert "process 0 of 2 wrote 3 shards" in outputs[0] and "process 1 of 2 wrote 2 shards" in outputs[1]
    assert all("prepared 9 examples from 13 items in 4 shards" in out for out in outputs)  # process 1 reports too
    assert data.read_manifest(tmp_path / "joined") == single
    assert shard_bytes(tmp_path / "joined") == shard_bytes(tmp_path / "single")
    assert sorted(read_examples(tmp_path / "joined")) == [f"good{i}.png" for i in range(9)]


def test_decode_workers_write_the_same_shards_and_skips_as_this_process(model, image_folder, prepared, tmp_path):
    manifest, out = prepared
    two = prepare(
        model, str(image_folder), tmp_path, resolution=RESOLUTION, shard_size=4, decode_workers=2, progress=False
    )
    assert two["skipped"] == manifest["skipped"] and two["skipped"]["corrupt"] == two["skipped"]["unreadable"] == 1
    assert shard_bytes(tmp_path) == shard_bytes(out)


def test_a_decode_worker_that_dies_ends_the_run_in_a_prepare_error():
    dies = Item("dies.png", functools.partial(os._exit, 1), "a caption")  # as a decoder crash or the OOM killer would
    with decoder(1, RESOLUTION, 1, MAX_PIXELS) as decode:
        with pytest.raises(PrepareError, match=r"a decode worker process died .*--decode-workers 0 to decode in this"):
            list(decode([dies]))


def test_decode_workers_end_when_the_process_that_started_them_is_killed():
    code = """
        import functools, multiprocessing, time
        import numpy as np
        from PIL import Image
        from perflow_jax.prepare_data import Item, decoder

        item = Item("grey.png", functools.partial(Image.fromarray, np.zeros((8, 8), np.uint8)), "a caption")
        with decoder(1, 8, 1, 10**6) as decode:
            list(decode([item]))
            print(*[worker.pid for worker in multiprocessing.active_children()], flush=True)
            time.sleep(600)
    """
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    (worker,) = [int(pid) for pid in parent.stdout.readline().split()]
    assert running(worker)
    parent.kill()  # SIGKILL: no clean-up in the parent
    parent.wait()
    deadline = time.monotonic() + 60  # a guard against a worker left behind, not a speed check
    while running(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    if running(worker):
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the decode worker outlived its parent")


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("value", ["-1", "two"])
def test_decode_workers_below_zero_are_an_argument_error(value, tmp_path, capsys):
    argv = ["--model", str(tmp_path), "--input", str(tmp_path), "--out", str(tmp_path / "out"), "--resolution", "32"]
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--decode-workers", value])
    assert exit_.value.code == 2
    assert f"argument --decode-workers: '{value}' is not a whole number of 0 or more" in capsys.readouterr().err


def test_cli_prints_a_summary_and_errors_exit_2(model, image_folder, tmp_path):
    command = [sys.executable, "-m", "perflow_jax.prepare_data", "--model", str(model), "--input", str(image_folder)]
    command += ["--out", str(tmp_path / "out"), "--resolution", str(RESOLUTION)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "prepared 9 examples from 13 items" in result.stdout
    assert "1 unreadable, 1 corrupt, 1 too_small, 1 no_caption" in result.stdout
    assert library_logs(result.stderr) == []
    bad = subprocess.run(command[:-1] + ["30"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "not a multiple of 4" in bad.stderr


def test_missing_source_is_named(model, tmp_path):
    with pytest.raises(PrepareError, match="neither a folder of images, nor webdataset .tar files, nor tfds"):
        prepare(model, str(tmp_path / "nowhere"), tmp_path / "out", resolution=RESOLUTION, progress=False)
    assert not (tmp_path / "out").exists()  # nothing started there: the corrected command runs


@pytest.mark.parametrize("out, flag", [("images/prepared", "--input"), ("model", "--model")])
def test_an_out_over_an_input_is_refused_before_the_model_loads(tmp_path, out, flag):
    (tmp_path / "images").mkdir()
    (tmp_path / "model").mkdir()  # no model in it: the check comes first
    with pytest.raises(PrepareError, match=f"--out {tmp_path / out} (is|lies inside) {flag} "):
        prepare(tmp_path / "model", str(tmp_path / "images"), tmp_path / out, resolution=RESOLUTION, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "model"] and not any(
        (tmp_path / "images").iterdir()
    )


def test_tpu_pod_joins_the_hosts_before_preparing(monkeypatch, tmp_path):
    joined = []
    monkeypatch.setattr(sharding, "initialize_distributed", joined.append)
    argv = ["--model", str(tmp_path), "--input", str(tmp_path), "--out", str(tmp_path / "out"), "--resolution", "32"]
    assert main(argv + ["--tpu-pod"]) == 2  # --out inside --input: refused after joining
    assert main(argv) == 2
    assert joined == [True, False]


def test_a_host_that_sees_other_input_files_than_host_0_is_refused(monkeypatch, tmp_path):
    out = tmp_path / "out"
    files = {0: {"a.png": [100, 1], "b.png": [100, 1]}, 1: {"a.png": [100, 1], "b.png": [120, 2]}}  # host 1's b.png
    settings = {
        host: prepare_data.Settings("images", 32, 3, "float16", 16, "fingerprint", None, MAX_PIXELS, 2, f"sha-{host}")
        for host in (0, 1)
    }
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)

    def sync(name):  # while host 1 waits at the first barrier, host 0 starts out with its own input
        if name == "perflow_prepare_checked":
            with monkeypatch.context() as host_0:
                host_0.setattr(jax, "process_index", lambda: 0)
                host_0.setattr(jax, "process_count", lambda: 1)
                prepare_data._start(out, settings[0], files[0])

    monkeypatch.setattr(prepare_data.multihost_utils, "sync_global_devices", sync)
    with pytest.raises(PrepareError, match=r"1 modified \(b.png\)\) \(on a pod every host must see the same input"):
        prepare_data._start(out, settings[1], files[1])
