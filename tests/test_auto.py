"""auto_prepare: the three forms, exact restoration, nesting, threads, and the source snippets."""

from __future__ import annotations

import asyncio
import threading
import warnings
from typing import TYPE_CHECKING, Any

import pytest

from mps_helpers import auto_prepare, plan_of
from mps_helpers._auto import AutoPrepareWarning, active_options

if TYPE_CHECKING:
    from pathlib import Path

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
testing = pytest.importorskip("mps_helpers.testing")

MPS = torch.backends.mps.is_available()
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD pipeline saved twice: default files and the source document's fp16 variant."""
    path = tmp_path_factory.mktemp("tiny-sd")
    pipe = testing.tiny_pipeline("sd")
    # 32 px by default (16x16 latents, 3x faster per step on a CPU than 64 px): the source
    # snippets run 101 steps at the pipeline's default size.
    pipe.unet.register_to_config(sample_size=16)
    pipe.save_pretrained(path, safe_serialization=True)
    pipe.save_pretrained(path, safe_serialization=True, variant="fp16")
    return path


def _patched_descriptors() -> dict[tuple[type, str], object]:
    """Every descriptor auto_prepare may replace, by identity."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image, DiffusionPipeline
    from diffusers.loaders.single_file import FromSingleFileMixin

    names = {
        DiffusionPipeline: ("from_pretrained", "from_pipe", "to", "enable_attention_slicing"),
        FromSingleFileMixin: ("from_single_file",),
        AutoPipelineForText2Image: ("from_pretrained", "from_pipe"),
        AutoPipelineForImage2Image: ("from_pretrained", "from_pipe"),
    }
    return {(owner, n): owner.__dict__[n] for owner, ns in names.items() for n in ns}


def _assert_prepared(pipe: Any, **expected: object) -> None:
    plan = plan_of(pipe)
    assert plan is not None, "expected a prepared pipeline"
    for name, value in expected.items():
        assert getattr(plan, name) == value, name


# ---------------------------------------------------------------------------------------
# The three forms


def test_bare_decorator_prepares_what_the_function_loads(model_dir: Path) -> None:
    @auto_prepare
    def load() -> tuple[Any, Any]:
        pipe = diffusers.DiffusionPipeline.from_pretrained(model_dir)
        return pipe, plan_of(pipe)

    pipe, plan_inside = load()
    assert plan_inside is not None  # prepared as soon as from_pretrained returned
    assert plan_of(pipe) is plan_inside
    assert load.__name__ == "load"  # functools.wraps


def test_decorator_with_options(model_dir: Path) -> None:
    @auto_prepare(device="cpu", attention_slicing=True, vae_slicing=True)
    def load() -> Any:
        return diffusers.StableDiffusionPipeline.from_pretrained(model_dir)

    pipe = load()
    _assert_prepared(pipe, device="cpu", attention_slicing=True, vae_slicing=True)
    processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert processors == {"SafeSlicedAttnProcessor"}


def test_context_manager_and_its_options(model_dir: Path) -> None:
    with auto_prepare(attention_slicing=True) as scope:
        assert active_options() == {"attention_slicing": True}
        pipe = diffusers.DiffusionPipeline.from_pretrained(model_dir)
    assert active_options() is None
    assert scope.options == {"attention_slicing": True}
    _assert_prepared(pipe, attention_slicing=True)
    assert repr(scope) == "auto_prepare(attention_slicing=True)"


def test_a_pipeline_the_function_returns_is_prepared() -> None:
    @auto_prepare(vae_tiling=True)
    def build() -> Any:
        return testing.tiny_pipeline("sd")  # built by its constructor, not a loader

    _assert_prepared(build(), vae_tiling=True)


def test_other_return_values_are_left_alone() -> None:
    @auto_prepare
    def answer(x: int) -> int:
        return x + 1

    assert answer(41) == 42


def test_async_functions_run_inside_the_scope(model_dir: Path) -> None:
    @auto_prepare(attention_slicing=True)
    async def load() -> Any:
        assert active_options() == {"attention_slicing": True}
        return diffusers.DiffusionPipeline.from_pretrained(model_dir)

    _assert_prepared(asyncio.run(load()), attention_slicing=True)
    assert active_options() is None


def test_generator_functions_are_refused() -> None:
    def pipelines() -> Any:
        yield 1

    with pytest.raises(TypeError, match="generator function"):
        auto_prepare(pipelines)


# ---------------------------------------------------------------------------------------
# Options are checked before anything changes


def test_unknown_option_is_a_type_error_at_decoration() -> None:
    with pytest.raises(TypeError, match=r"'slicing'.*valid options are env, height"):
        auto_prepare(slicing=True)


def test_function_and_options_together_are_refused() -> None:
    with pytest.raises(TypeError, match="either a function or keyword options"):
        auto_prepare(print, device="cpu")  # type: ignore[call-overload]  # refused on purpose


def test_bad_value_raises_on_entering_and_patches_nothing() -> None:
    before = _patched_descriptors()
    scope = auto_prepare(attention_slicing="sometimes")
    with pytest.raises(ValueError, match="'auto', True, False"), scope:
        pytest.fail("the body must not run")
    assert _patched_descriptors() == before
    assert active_options() is None


# ---------------------------------------------------------------------------------------
# Exact restoration, nesting, threads


def test_descriptors_are_restored_exactly_after_normal_and_failing_exits(
    model_dir: Path,
) -> None:
    before = _patched_descriptors()
    with auto_prepare():
        during = _patched_descriptors()
    assert all(during[key] is not before[key] for key in before)  # all patched inside
    assert all(_patched_descriptors()[key] is before[key] for key in before)

    with pytest.raises(KeyError), auto_prepare(device="cpu"):
        raise KeyError("boom")
    assert all(_patched_descriptors()[key] is before[key] for key in before)

    # Outside any scope, loading is diffusers' own.
    assert plan_of(diffusers.DiffusionPipeline.from_pretrained(model_dir)) is None


def test_nested_scopes_inner_options_win_inside(model_dir: Path) -> None:
    before = _patched_descriptors()
    with auto_prepare(attention_slicing=True, vae_slicing=True):
        with auto_prepare(attention_slicing=False):
            assert active_options() == {"attention_slicing": False, "vae_slicing": True}
            inner = diffusers.DiffusionPipeline.from_pretrained(model_dir)
        assert _patched_descriptors() != before  # the outer scope still holds the patches
        outer = diffusers.DiffusionPipeline.from_pretrained(model_dir)
    _assert_prepared(inner, attention_slicing=False, vae_slicing=True)
    _assert_prepared(outer, attention_slicing=True, vae_slicing=True)
    assert all(_patched_descriptors()[key] is before[key] for key in before)


def test_the_same_scope_object_can_be_reentered(model_dir: Path) -> None:
    scope = auto_prepare(vae_slicing=True)
    with scope, scope:
        pipe = diffusers.DiffusionPipeline.from_pretrained(model_dir)
    assert active_options() is None
    _assert_prepared(pipe, vae_slicing=True)


def test_another_threads_pipelines_are_not_prepared(model_dir: Path) -> None:
    seen: dict[str, Any] = {}

    def load_elsewhere() -> None:
        seen["options"] = active_options()
        seen["plan"] = plan_of(diffusers.DiffusionPipeline.from_pretrained(model_dir))

    with auto_prepare(device="cpu"):
        worker = threading.Thread(target=load_elsewhere)
        worker.start()
        worker.join()
        mine = diffusers.DiffusionPipeline.from_pretrained(model_dir)
    assert seen == {"options": None, "plan": None}
    _assert_prepared(mine, device="cpu")


def test_a_scope_in_another_thread_does_not_leak_here(model_dir: Path) -> None:
    entered, done = threading.Event(), threading.Event()
    before = _patched_descriptors()

    def hold_a_scope() -> None:
        with auto_prepare(attention_slicing=True):
            entered.set()
            done.wait(timeout=60)

    worker = threading.Thread(target=hold_a_scope)
    worker.start()
    try:
        assert entered.wait(timeout=60)
        assert _patched_descriptors() != before  # patched process-wide ...
        pipe = diffusers.DiffusionPipeline.from_pretrained(model_dir)
        assert plan_of(pipe) is None  # ... but not for this thread
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pipe.enable_attention_slicing()  # diffusers' own, no redirect here
        assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {
            "SlicedAttnProcessor"
        }
    finally:
        done.set()
        worker.join()
    assert all(_patched_descriptors()[key] is before[key] for key in before)


# ---------------------------------------------------------------------------------------
# Every loader


def test_from_pipe_and_auto_pipelines_come_out_prepared(model_dir: Path) -> None:
    with auto_prepare(attention_slicing=True):
        text2image = diffusers.AutoPipelineForText2Image.from_pretrained(model_dir)
        image2image = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(text2image)
        back = diffusers.AutoPipelineForText2Image.from_pipe(image2image)
    for pipe, name in (
        (text2image, "StableDiffusionPipeline"),
        (image2image, "StableDiffusionImg2ImgPipeline"),
        (back, "StableDiffusionPipeline"),
    ):
        assert type(pipe).__name__ == name
        _assert_prepared(pipe, attention_slicing=True)


def test_only_the_outermost_loader_prepares(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mps_helpers import _apply

    calls: list[str] = []
    real = _apply.prepare_pipeline

    def counting(pipe: Any, **options: Any) -> Any:
        calls.append(type(pipe).__name__)
        return real(pipe, **options)

    monkeypatch.setattr(_apply, "prepare_pipeline", counting)
    with auto_prepare():
        # AutoPipelineForText2Image.from_pretrained calls the concrete class's loader.
        diffusers.AutoPipelineForText2Image.from_pretrained(model_dir)
    assert calls == ["StableDiffusionPipeline"]


def test_from_single_file_is_covered_while_active() -> None:
    from diffusers.loaders.single_file import FromSingleFileMixin

    original = FromSingleFileMixin.__dict__["from_single_file"]
    with auto_prepare():
        patched = FromSingleFileMixin.__dict__["from_single_file"]
        assert patched is not original
        assert patched.__func__.__mps_helpers_original__ is original
        # Inherited, not overridden: the pipeline classes see the patched loader.
        assert diffusers.StableDiffusionPipeline.from_single_file.__func__ is patched.__func__
    assert FromSingleFileMixin.__dict__["from_single_file"] is original


# ---------------------------------------------------------------------------------------
# Code written for another machine: .to() and enable_attention_slicing()


@pytest.mark.skipif(MPS and CUDA, reason="needs a device kind this machine lacks")
def test_to_a_missing_device_keeps_the_planned_placement(model_dir: Path) -> None:
    missing = "cuda" if MPS else "mps"
    with auto_prepare():
        pipe = diffusers.DiffusionPipeline.from_pretrained(model_dir)
        plan = plan_of(pipe)
        assert plan is not None
        with pytest.warns(AutoPrepareWarning, match=rf"to\('{missing}'\) ignored.*no {missing}"):
            assert pipe.to(missing) is pipe
        with pytest.warns(AutoPrepareWarning):
            pipe.to(device=missing, dtype=torch.float16)
        assert pipe.unet.device.type == plan.device
        assert pipe.unet.dtype == plan.dtype
        # A device that exists, and dtype-only moves, are done as asked.
        with warnings.catch_warnings():
            warnings.simplefilter("error", AutoPrepareWarning)
            pipe.to("cpu")
            pipe.to(torch.bfloat16)
        assert pipe.unet.device.type == "cpu"
        assert pipe.unet.dtype == torch.bfloat16
    # Outside the scope the redirect is gone: diffusers/torch report the missing device.
    with pytest.raises((RuntimeError, AssertionError)):
        pipe.to(missing)


def test_to_cannot_undo_a_device_or_dtype_given_to_auto_prepare(model_dir: Path) -> None:
    with auto_prepare(device="cpu", dtype="float32"):
        pipe = diffusers.DiffusionPipeline.from_pretrained(model_dir)
        # "meta" exists everywhere: only the forced device keeps the pipeline where it is.
        with pytest.warns(AutoPrepareWarning, match=r"to\('meta'\) ignored: device='cpu' was"):
            assert pipe.to("meta") is pipe
        with pytest.warns(AutoPrepareWarning, match=r"dtype='float32' was given to auto_prepare"):
            pipe.to(torch.float16)
        with pytest.warns(AutoPrepareWarning, match=r"to\('cpu', torch.float16\): its dtype"):
            pipe.to("cpu", torch.float16)
        assert (pipe.unet.device.type, pipe.unet.dtype) == ("cpu", torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("error", AutoPrepareWarning)
            pipe.to("cpu", dtype=torch.float32)  # what the plan says anyway: no warning


def test_enable_attention_slicing_keeps_the_safe_plan(model_dir: Path) -> None:
    with auto_prepare(attention_slicing=True):
        pipe = diffusers.DiffusionPipeline.from_pretrained(model_dir)
        before = dict(pipe.unet.attn_processors)
        with pytest.warns(AutoPrepareWarning, match=r"enable_attention_slicing\(\) ignored"):
            pipe.enable_attention_slicing()
        with pytest.warns(AutoPrepareWarning, match=r"disable_attention_slicing\(\) ignored"):
            pipe.disable_attention_slicing()
        assert dict(pipe.unet.attn_processors) == before


def test_enable_attention_slicing_is_diffusers_own_when_the_plan_says_diffusers(
    model_dir: Path,
) -> None:
    with auto_prepare(attention_processor="diffusers"):
        pipe = diffusers.DiffusionPipeline.from_pretrained(model_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("error", AutoPrepareWarning)
            pipe.enable_attention_slicing()
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"SlicedAttnProcessor"}


# ---------------------------------------------------------------------------------------
# The source document's snippets, pasted unchanged


@pytest.mark.slow
def test_the_source_documents_snippets_run_prepared(model_dir: Path) -> None:
    local_tiny_dir = str(model_dir)

    @auto_prepare
    def snippets() -> Any:
        # --- snippet 1 (the model id replaced by the local tiny directory) -------------
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(
            local_tiny_dir, torch_dtype=torch.float16, variant="fp16", use_safetensors=True
        ).to("mps")
        pipe.enable_attention_slicing()
        prompt = "a photo of an astronaut riding a horse on mars"
        image = pipe(prompt).images[0]
        # --- snippet 2 ---------------------------------------------------------------
        # First-time "warmup" pass if PyTorch version is 1.13
        _ = pipe(prompt, num_inference_steps=1)
        # Results match those from the CPU device after the warmup pass.
        image = pipe(prompt).images[0]
        # --- snippet 3 (it names the pipeline `pipeline`) ------------------------------
        pipeline = pipe
        pipeline.enable_attention_slicing()
        return pipe, image

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", AutoPrepareWarning)
        pipe, image = snippets()
    plan = plan_of(pipe)
    assert plan is not None
    assert image.size == (32, 32)
    # Both enable_attention_slicing() calls kept the plan's (safe) attention ...
    slicing = [w for w in caught if "enable_attention_slicing" in str(w.message)]
    assert len(slicing) == 2
    # ... and .to("mps") was done on a Mac, redirected (with a warning) elsewhere.
    moved = [w for w in caught if ".to('mps')" in str(w.message)]
    assert len(moved) == (0 if MPS else 1)
    assert pipe.unet.device.type == plan.device
    assert pipe.unet.dtype == plan.dtype
    if plan.attention_slicing:
        names = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
        assert names == {"SafeSlicedAttnProcessor"}
