"""Tests of load_pipeline: dtype decided before loading, fp16 variants, dtype keyword, offline."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import torch
from machines import MACHINES
from packaging.version import Version

from mps_helpers import _load, load_pipeline, plan_of
from mps_helpers._facts import facts_of_directory
from mps_helpers._load import dtype_keyword, has_variant
from mps_helpers._plan import make_plan, validate_options
from mps_helpers.testing import save_tiny_pipeline, tiny_pipeline

if TYPE_CHECKING:
    from pathlib import Path

CPU = MACHINES["linux-cpu"]
#: Per-call features off, so that loading tests never wait on a pipeline call.
QUIET: dict[str, Any] = {
    "env": CPU,
    "device": "cpu",
    "attention_slicing": False,
    "batch_to_loop": False,
    "nan_guard": False,
}


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny SD pipeline with default (float32) files only."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("plain"), "sd")


@pytest.fixture(scope="module")
def variant_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default float32 files from seed 0 and fp16 variant files from seed 1, side by side."""
    path = save_tiny_pipeline(tmp_path_factory.mktemp("variant"), "sd", seed=0)
    tiny_pipeline("sd", seed=1).to(torch.float16).save_pretrained(path, variant="fp16")
    return path


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record the keyword arguments of every DiffusionPipeline.from_pretrained call."""
    from diffusers import DiffusionPipeline

    real = DiffusionPipeline.from_pretrained
    seen: list[dict[str, Any]] = []

    def spy(cls: Any, model: Any, **kwargs: Any) -> Any:
        seen.append(dict(kwargs))
        return real(model, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(spy))
    return seen


def test_loads_a_local_directory_offline_and_prepares_it(
    plain_dir: Path, calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("load_pipeline went to the network for a local directory")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    pipe = load_pipeline(plain_dir, **QUIET)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    plan = plan_of(pipe)
    assert plan is not None
    assert plan.device == "cpu"
    assert plan.dtype == torch.float32
    assert pipe.unet.dtype == torch.float32
    (kwargs,) = calls
    assert kwargs["use_safetensors"] is True
    assert kwargs[dtype_keyword(_load.installed_diffusers_version())] == torch.float32
    assert "variant" not in kwargs


def test_float16_is_decided_before_loading(plain_dir: Path, calls: list[dict[str, Any]]) -> None:
    pipe = load_pipeline(plain_dir, **QUIET, dtype="float16")
    (kwargs,) = calls
    # the loader got the dtypes (the VAE's too): nothing loaded in float32 and cast later
    keyword = dtype_keyword(_load.installed_diffusers_version())
    assert kwargs[keyword] == {"default": torch.float16, "vae": torch.float32}
    assert "variant" not in kwargs  # this repository has no fp16 files
    assert pipe.unet.dtype == torch.float16
    assert pipe.text_encoder.dtype == torch.float16
    assert pipe.vae.dtype == torch.float32
    # the float32 VAE was read from the float32 files, never rounded through float16
    reference = tiny_pipeline("sd", seed=0).vae.state_dict()
    for key, value in pipe.vae.state_dict().items():
        assert torch.equal(value, reference[key])


def test_prefers_fp16_variant_files(variant_dir: Path, calls: list[dict[str, Any]]) -> None:
    assert has_variant(variant_dir, "fp16")
    pipe = load_pipeline(variant_dir, **QUIET, dtype=torch.float16)
    assert calls[0]["variant"] == "fp16"
    assert pipe.unet.dtype == torch.float16
    seed1 = tiny_pipeline("sd", seed=1).unet.to(torch.float16).state_dict()
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, seed1[key]), key  # the variant's weights, not the default's


def test_float32_plans_load_the_default_files(
    variant_dir: Path, calls: list[dict[str, Any]]
) -> None:
    pipe = load_pipeline(variant_dir, **QUIET)
    assert "variant" not in calls[0]
    seed0 = tiny_pipeline("sd", seed=0).unet.state_dict()
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, seed0[key]), key


def test_torch_dtype_is_another_name_for_dtype(
    plain_dir: Path, calls: list[dict[str, Any]]
) -> None:
    pipe = load_pipeline(plain_dir, **QUIET, torch_dtype=torch.float16)
    assert plan_of(pipe).dtype == torch.float16
    assert "torch_dtype" not in calls[0]  # the installed diffusers wants dtype=


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtype": "float32", "torch_dtype": torch.float16}, "disagree"),
        ({"attention_slicing": "sometimes"}, "'auto', True, False"),
        ({"device": "tpu"}, "'auto', 'mps', 'cuda', 'cpu'"),
    ],
)
def test_option_errors_are_raised_before_loading(
    plain_dir: Path, calls: list[dict[str, Any]], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_pipeline(plain_dir, **{**QUIET, **options})
    assert calls == []


# ---------------------------------------------------------------------------------------
# What the installed diffusers expects, with a fake loader


@pytest.fixture
def fake_loader(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace from_pretrained with a fake that has no fp16 variant on the 'Hub'."""
    from diffusers import DiffusionPipeline

    seen: list[dict[str, Any]] = []

    def fake(cls: Any, model: Any, **kwargs: Any) -> Any:
        seen.append(dict(kwargs))
        if kwargs.get("variant") == "fp16":
            raise ValueError(
                "You are trying to load the model files of the `variant=fp16`, but no such "
                "modeling files are available."
            )
        return tiny_pipeline("sd")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(fake))
    return seen


def test_hub_repositories_fall_back_when_they_have_no_fp16_variant(
    fake_loader: list[dict[str, Any]],
) -> None:
    pipe = load_pipeline("someone/some-model", **QUIET, dtype="float16")
    first, second = fake_loader
    assert first["variant"] == "fp16"
    assert "variant" not in second
    # the VAE's config is unknown before loading a Hub model: one dtype for all
    assert second[dtype_keyword(_load.installed_diffusers_version())] == torch.float16
    assert plan_of(pipe).dtype == torch.float16


def test_explicit_from_pretrained_arguments_win(fake_loader: list[dict[str, Any]]) -> None:
    load_pipeline("someone/model", **QUIET, dtype="float16", variant="ema", use_safetensors=False)
    (kwargs,) = fake_loader
    assert kwargs["variant"] == "ema"
    assert kwargs["use_safetensors"] is False


def test_other_loading_errors_are_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import DiffusionPipeline

    def fake(cls: Any, model: Any, **kwargs: Any) -> Any:
        raise OSError("someone/missing is not a valid model identifier")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(fake))
    with pytest.raises(OSError, match="not a valid model identifier"):
        load_pipeline("someone/missing", **QUIET, dtype="float16")


@pytest.mark.parametrize(
    "case",
    [
        ("0.31.0", "torch_dtype", False),
        ("0.33.1", "torch_dtype", True),
        ("0.39.0", "torch_dtype", True),
        ("0.40.0", "dtype", True),
        ("0.42.1", "dtype", True),
    ],
)
def test_dtype_is_passed_as_the_installed_diffusers_expects(
    plain_dir: Path,
    fake_loader: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    case: tuple[str, str, bool],
) -> None:
    version, keyword, as_dict = case
    monkeypatch.setattr(_load, "installed_diffusers_version", lambda: Version(version))
    load_pipeline(plain_dir, **QUIET, dtype="float16", variant=None)
    (kwargs,) = fake_loader
    other = "dtype" if keyword == "torch_dtype" else "torch_dtype"
    assert other not in kwargs
    expected: Any = {"default": torch.float16, "vae": torch.float32} if as_dict else torch.float16
    assert kwargs[keyword] == expected


def test_dtype_keyword() -> None:
    assert dtype_keyword(Version("0.39.0")) == "torch_dtype"
    assert dtype_keyword(Version("0.40.0")) == "dtype"
    assert dtype_keyword(Version("1.0.0.dev0")) == "dtype"
    assert dtype_keyword(None) == "torch_dtype"  # every release accepts torch_dtype


# ---------------------------------------------------------------------------------------
# What a directory says before loading


def test_facts_of_a_directory(plain_dir: Path, tmp_path: Path) -> None:
    facts = facts_of_directory(plain_dir)
    assert facts.class_name == "StableDiffusionPipeline"
    assert facts.denoiser_class == "UNet2DConditionModel"
    assert facts.supports_attention_slicing is True
    assert facts.vae_force_upcast is True
    assert facts.weights_dtype == torch.float32
    assert (facts.default_height, facts.default_width) == (64, 64)
    assert facts_of_directory(tmp_path) == type(facts)()  # not a pipeline: all unknown


def test_bfloat16_weights_are_read_from_the_file_header(tmp_path: Path) -> None:
    tiny_pipeline("sd3").to(torch.bfloat16).save_pretrained(tmp_path)
    facts = facts_of_directory(tmp_path)
    assert facts.weights_dtype == torch.bfloat16
    assert facts.supports_attention_slicing is False
    m3 = make_plan(facts, MACHINES["m3max-64gb-macos14"], validate_options())
    assert m3.dtype == torch.bfloat16
    m2 = make_plan(facts, MACHINES["m2-16gb-macos13-torch2.0"], validate_options())
    assert m2.dtype == torch.float16
