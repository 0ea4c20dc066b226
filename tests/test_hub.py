"""convert --from ORG/NAME[@REVISION]: what is downloaded, the cache as huggingface_hub lays it out, errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx2
import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import errors
from huggingface_hub.utils import filter_repo_objects

from perflow_jax import export, hub, weights
from perflow_jax.convert import ConversionError, convert
from tests.helpers.pipelines import quiet

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "perflow_jax/demo/digits_teacher"
SHA = "0123456789abcdef0123456789abcdef01234567"

# The files of a Stable Diffusion 1.5 repository on the hub (weights as empty stand-ins).
SD15_REPO = [
    "model_index.json",
    "README.md",
    "v1-5-pruned.safetensors",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.bin",
]
CONFIGS = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "vae/config.json",
]


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """snapshot_download over a fake repository holding SD15_REPO: copies what allow_patterns select."""
    remote = tmp_path / "remote"
    for name in SD15_REPO:
        (remote / name).parent.mkdir(parents=True, exist_ok=True)
        (remote / name).write_text(name)
    calls = []

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None):
        calls.append((repo_id, revision))
        snapshot = tmp_path / "cache" / SHA
        for name in filter_repo_objects(SD15_REPO, allow_patterns=allow_patterns):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(remote / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def downloaded(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_configs_tokenizers_and_the_plain_safetensors_are_downloaded(fake_hub):
    folder, origin = hub.download_pipeline("acme/sd15@v2", None, ConversionError, quiet)
    assert origin == f"acme/sd15@{SHA}" and fake_hub[0] == ("acme/sd15", "v2")
    # vae has no plain safetensors: its plain .bin, not its fp16 safetensors
    assert downloaded(folder) == sorted(
        CONFIGS
        + ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors"]
        + ["vae/diffusion_pytorch_model.bin"]
    )


def test_variant_fp16_downloads_only_the_fp16_safetensors(fake_hub):
    folder, _ = hub.download_pipeline("acme/sd15", "fp16", ConversionError, quiet)
    assert downloaded(folder) == sorted(
        CONFIGS
        + ["text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"]
        + ["vae/diffusion_pytorch_model.fp16.safetensors"]
    )
    assert fake_hub == [("acme/sd15", None)]  # one call: no network lacks fp16 safetensors


def test_shards_of_one_variant_are_selected():
    files = [
        f"unet/diffusion_pytorch_model{suffix}"
        for suffix in (
            ".safetensors.index.json",
            "-00001-of-00002.safetensors",
            "-00002-of-00002.safetensors",
            ".safetensors.index.fp16.json",
            "-00001-of-00002.fp16.safetensors",
        )
    ]
    plain = hub._weight_patterns(["unet"], None, "safetensors")
    fp16 = hub._weight_patterns(["unet"], "fp16", "safetensors")
    assert list(filter_repo_objects(files, allow_patterns=plain)) == files[:3]
    assert list(filter_repo_objects(files, allow_patterns=fp16)) == files[3:]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("acme/sd15", True), ("acme/sd-1.5@refs/pr/3", True), ("/abs/acme/sd15", False), ("a/b/c", False)],
)
def test_hub_ids_are_told_from_paths(spec, expected):
    assert hub.is_hub_id(spec) is expected


def test_an_existing_local_folder_is_never_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme/sd15").mkdir(parents=True)
    assert not hub.is_hub_id("acme/sd15")


def test_hub_id_converts_from_the_offline_cache_as_the_folder_does(tmp_path):
    """HF_HOME's hub cache laid out as huggingface_hub does; HF_HUB_OFFLINE=1, so nothing is fetched."""
    storage = tmp_path / "hf/hub/models--acme--digits"
    shutil.copytree(TEACHER, storage / "snapshots" / SHA)
    (storage / "refs").mkdir()
    (storage / "refs/main").write_text(SHA)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    command = [sys.executable, "-m", "perflow_jax.convert", "--from", "acme/digits", "--out", str(tmp_path / "hub")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    convert(TEACHER, tmp_path / "folder", log=quiet)
    manifest = json.loads((tmp_path / "hub" / weights.CONVERTED_MANIFEST).read_text())
    assert manifest["source"] == f"acme/digits@{SHA}"
    for name in ("unet", "vae", "text_encoder"):
        expected = weights.flatten(weights.read_component(tmp_path / "folder", name)[2])
        actual = weights.flatten(weights.read_component(tmp_path / "hub", name)[2])
        assert actual.keys() == expected.keys()
        for key, value in expected.items():
            np.testing.assert_array_equal(actual[key], value, err_msg=f"{name} {key}")
    assert sorted(os.listdir(tmp_path / "hub/tokenizer")) == sorted(os.listdir(TEACHER / "tokenizer"))


# ---- errors: one line each, with what to do; nothing written ----------------------------------


def test_offline_and_not_cached_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = (
        r"--from acme/sd15 is no local folder, and acme/sd15 is not \(wholly\) in the Hugging Face cache "
        rf"\({tmp_path / 'empty'}\) while the hub cannot be reached .* download it once with network access"
    )
    with pytest.raises(ConversionError, match=message):
        convert("acme/sd15", tmp_path / "out", log=quiet)
    assert not (tmp_path / "out").exists()


def http_error(kind):
    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/acme/sd15"))
    return kind("the hub's own message", response=response)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (errors.RepositoryNotFoundError, r"--from acme/sd15@v2 is no local folder and no Hugging Face Hub repository"),
        (errors.GatedRepoError, r"acme/sd15 is gated: accept its licence on https://huggingface.co/acme/sd15, .*login"),
        (errors.RevisionNotFoundError, r"acme/sd15 has no revision 'v2': give a branch, tag or commit that exists"),
    ],
)
def test_hub_errors_say_what_to_do(kind, message, tmp_path, monkeypatch):
    def snapshot_download(*args, **kwargs):
        raise http_error(kind)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(ConversionError, match=message) as raised:
        convert("acme/sd15@v2", tmp_path / "out", log=quiet)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()


# ---- export --push-to-hub: the folder and its model card, uploaded through HfApi ---------------

METRICS = {
    "samplers": {"perflow_4": {"images": 64, "seconds": 2.0, "images_per_second": 32.0, "fid": {"teacher:8": 12.3456}}},
    "feature_network": "digits",
    "settings": {"steps": [4], "guidance": 1.5, "num_images": 64},
}


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """The demo teacher plus the demo's delta, converted: a PeRFlow student folder."""
    folder = tmp_path_factory.mktemp("student") / "converted"
    delta = ROOT / "perflow_jax/demo/digits_perflow_delta.safetensors"
    convert(TEACHER, folder, perflow_delta=delta, log=quiet)
    return folder


@pytest.fixture
def fake_api(monkeypatch):
    """HfApi.create_repo and upload_folder recorded; the card as it was when uploaded."""
    calls = {}

    def create_repo(self, repo_id, *, exist_ok=False):
        calls["create_repo"] = (repo_id, exist_ok)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, commit_message):
        calls["upload_folder"] = (repo_id, Path(folder_path), sorted(os.listdir(folder_path)))
        calls["card"] = (Path(folder_path) / "README.md").read_text()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_export_with_a_card_of_its_recipe_and_figures(student, tmp_path, fake_api):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval/metrics.json").write_text(json.dumps(METRICS))
    argv = ["--to-torch", "--model", str(student), "--out", str(tmp_path / "out"), "--push-to-hub", "acme/digits-4"]
    assert export.main([*argv, "--evaluation", str(tmp_path / "eval")]) == 0
    assert fake_api["create_repo"] == ("acme/digits-4", True)
    assert fake_api["upload_folder"] == ("acme/digits-4", tmp_path / "out", ["README.md", "scheduler", "unet"])
    card = fake_api["card"]
    for row in [
        f"| base model | {TEACHER.resolve()} |",
        "| parameterization | diff_eps |",
        "| time windows | 4 |",
        "| sampling steps | 4 |",
        "| guidance | 1.5 |",
        "| perflow_4 | 64 | 12.35 vs teacher:8 |  |",
    ]:
        assert row in card.splitlines(), row
    assert "num_inference_steps=4, guidance_scale=1.5" in card and "base_model:" not in card


def test_card_names_a_hub_base_model_after_convert_from_a_hub_id(student, tmp_path):
    shutil.copytree(student, tmp_path / "student", ignore=shutil.ignore_patterns("params"))
    manifest = tmp_path / "student" / weights.CONVERTED_MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "source": f"acme/digits@{SHA}"}))
    card = hub.model_card(tmp_path / "student", tmp_path / "student", step=None, base=None, metrics=None)
    assert "base_model: acme/digits" in card.splitlines() and f"| base model | acme/digits@{SHA} |" in card
    assert "| guidance | sample's default |" in card and "## Quality" not in card


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (401, r"--push-to-hub acme/x: not logged in, or the token is invalid: run `hf auth login` or set HF_TOKEN"),
        (403, r"--push-to-hub acme/x: this token may not write there \(another user's .*; the export stays in "),
    ],
)
def test_push_errors_say_what_to_do(status, message, tmp_path, monkeypatch):
    def create_repo(self, repo_id, *, exist_ok=False):
        response = httpx2.Response(status, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))
        raise errors.HfHubHTTPError("the hub's own message", response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    with pytest.raises(export.ExportError, match=message) as raised:
        hub.push_folder(tmp_path, "acme/x", "card", export.ExportError, quiet)
    assert "\n" not in str(raised.value)


def test_evaluation_without_metrics_is_refused_before_exporting(student, tmp_path, capsys):
    argv = ["--to-torch", "--model", str(student), "--out", str(tmp_path / "out"), "--push-to-hub", "acme/x"]
    assert export.main([*argv, "--evaluation", str(tmp_path)]) == 2
    assert f"--evaluation {tmp_path} holds no metrics.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
