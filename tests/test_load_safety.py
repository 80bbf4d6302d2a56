"""Loading safely: float8 checkpoints upcast while loading (read once), device_map to mps."""

from __future__ import annotations

import builtins
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from _emulation import no_float8
from machines import MACHINES
from packaging.version import Version

from mps_helpers import load_pipeline
from mps_helpers._facts import facts_of_directory
from mps_helpers._family_facts import safetensors_dtypes
from mps_helpers._load_safety import safe_load_kwargs
from mps_helpers._plan import make_plan, validate_options
from mps_helpers.testing import save_tiny_pipeline

CPU = MACHINES["linux-cpu"]
M4 = MACHINES["m4-128gb-macos15-torch-latest"]
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD3 pipeline whose transformer weights are stored as float8_e4m3fn."""
    root = save_tiny_pipeline(tmp_path_factory.mktemp("fp8") / "sd3", "sd3")
    path = root / "transformer" / WEIGHTS
    tensors = safetensors.torch.load_file(path)
    safetensors.torch.save_file({k: v.to(torch.float8_e4m3fn) for k, v in tensors.items()}, path)
    return root


def run(pipe: Any) -> Any:
    return pipe(
        "a", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images


class Reads:
    """Counts, per weights file, the opens and bytes read through Python and the loader."""

    def __init__(self) -> None:
        self.opens: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self.loads: dict[str, int] = {}


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Reads:
    counts = Reads()
    real_open = builtins.open

    class Counted:
        def __init__(self, handle: Any, name: str) -> None:
            self._handle, self._name = handle, name

        def read(self, *args: Any) -> Any:
            data = self._handle.read(*args)
            counts.bytes[self._name] = counts.bytes.get(self._name, 0) + len(data)
            return data

        def __getattr__(self, attr: str) -> Any:
            return getattr(self._handle, attr)

        def __enter__(self) -> Counted:
            return self

        def __exit__(self, *exc: Any) -> None:
            self._handle.close()

    def spy_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, *args, **kwargs)
        name = str(file)
        if name.endswith(".safetensors"):
            counts.opens[name] = counts.opens.get(name, 0) + 1
            return Counted(handle, name)
        return handle

    def spy_loader(real: Any) -> Any:
        def load(path: Any, *args: Any, **kwargs: Any) -> Any:
            counts.loads[str(path)] = counts.loads.get(str(path), 0) + 1
            return real(path, *args, **kwargs)

        return load

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(safetensors.torch, "load_file", spy_loader(safetensors.torch.load_file))
    monkeypatch.setattr(safetensors, "safe_open", spy_loader(safetensors.safe_open))
    return counts


def header_size(path: Path) -> int:
    with path.open("rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def test_the_header_says_float8(fp8_dir: Path) -> None:
    assert safetensors_dtypes(fp8_dir / "transformer") == ("F8_E4M3",)
    assert safetensors_dtypes(fp8_dir / "vae") == ("F32",)
    assert safetensors_dtypes(fp8_dir / "missing") == ()


@pytest.mark.parametrize(
    ("machine", "expected"),
    [("m4-128gb-macos15-torch-latest", "bfloat16"), ("m2-16gb-macos13-torch2.0", "float16")],
)
def test_the_plan_upcasts_float8_weights_and_says_why(
    fp8_dir: Path, machine: str, expected: str
) -> None:
    plan = make_plan(facts_of_directory(fp8_dir), MACHINES[machine], validate_options())
    assert str(plan.dtype) == f"torch.{expected}"
    assert plan.reasons["dtype"].startswith("the weights are stored as F8_E4M3 (float8)")
    assert "pytorch #148420" in plan.reasons["dtype"]


def test_load_pipeline_upcasts_float8_reading_the_weights_once(fp8_dir: Path, reads: Reads) -> None:
    from diffusers import DiffusionPipeline

    weights = str(fp8_dir / "transformer" / WEIGHTS)
    # Loading happens on the CPU (on a Mac too); the call is the device's work.
    pipe = load_pipeline(fp8_dir, env=CPU, device="cpu", nan_guard=False)
    held = {t.dtype for m in pipe.components.values() if isinstance(m, torch.nn.Module)
            for t in [*m.parameters(), *m.buffers()]}  # fmt: skip
    assert not any(dtype.itemsize == 1 and dtype.is_floating_point for dtype in held)
    with no_float8():
        out = run(pipe)
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.float32}
    assert reads.loads.get(weights) == 1  # the weights: read once, by the loader
    # Python itself only ever read the 8-byte length and the JSON header of that file.
    opens = reads.opens.get(weights, 0)
    assert reads.bytes.get(weights, 0) <= opens * header_size(Path(weights))
    reference = run(DiffusionPipeline.from_pretrained(fp8_dir, dtype=torch.float32))
    assert np.isfinite(out).all()
    assert abs(out - reference).max() <= 1e-6


# ---------------------------------------------------------------------------------------
# device_map="mps"


def mac(torch_version: str) -> Any:
    return M4.replace(torch_version=Version(torch_version))


@pytest.mark.parametrize("device_map", ["mps", "mps:0", {"": "mps"}, torch.device("mps")])
def test_device_map_to_mps_is_dropped_before_torch_2_13(device_map: Any) -> None:
    with pytest.warns(UserWarning, match=r"torch 2\.12\.1 \(before 2\.13\).*diffusers #13227"):
        kwargs = safe_load_kwargs({"device_map": device_map, "variant": "fp16"}, mac("2.12.1"))
    assert kwargs == {"variant": "fp16"}


@pytest.mark.parametrize(
    ("device_map", "version"), [("mps", "2.13.0"), ("balanced", "2.5.1"), ("cuda", "2.5.1")]
)
def test_other_device_maps_are_kept(device_map: str, version: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kwargs = safe_load_kwargs({"device_map": device_map}, mac(version))
    assert kwargs == {"device_map": device_map}


def test_load_pipeline_loads_without_the_unsafe_device_map(fp8_dir: Path) -> None:
    with pytest.warns(UserWarning, match="device_map='mps' ignored"):
        pipe = load_pipeline(
            fp8_dir, env=mac("2.5.1"), device="cpu", device_map="mps", nan_guard=False
        )
    assert pipe.transformer.device.type == "cpu"
