"""Tests of the batch adapter's pure helpers: binding, counting, splitting and merging."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections import OrderedDict
from typing import Any, List, Optional, Union  # noqa: UP035 - the spellings diffusers uses

import numpy as np
import pytest
import torch

from mps_helpers._batch import (
    batch_size,
    bind_call,
    call_signature,
    merge_outputs,
    merge_values,
    split_batch,
)
from mps_helpers._per_prompt import count_prompts, roles_of


class _Pipe:
    """A stand-in with a diffusers-like call signature."""

    def __call__(
        self,
        prompt: Any = None,
        height: int | None = None,
        num_inference_steps: int = 50,
        num_images_per_prompt: int | None = 1,
        generator: Any = None,
        **kwargs: Any,
    ) -> Any:
        return None


# ---------------------------------------------------------------------------------------
# bind_call / call_signature


def test_bind_call_names_positional_arguments_and_flattens_var_keyword() -> None:
    call = functools.partial(_Pipe.__call__, _Pipe())
    bound = bind_call(call, ("a cat", 32), {"callback_steps": 1, "generator": None})
    assert bound is not None
    assert bound.kwargs == {
        "prompt": "a cat",
        "height": 32,
        "generator": None,
        "callback_steps": 1,
    }
    assert bound.num_images_per_prompt == 1


@pytest.mark.parametrize(("given", "expected"), [({}, 1), ({"num_images_per_prompt": 3}, 3)])
def test_bind_call_reports_num_images_per_prompt(given: dict[str, Any], expected: int) -> None:
    bound = bind_call(functools.partial(_Pipe.__call__, _Pipe()), (), given)
    assert bound is not None
    assert bound.num_images_per_prompt == expected


def test_bind_call_returns_none_when_arguments_do_not_bind() -> None:
    call = functools.partial(_Pipe.__call__, _Pipe())
    assert bind_call(call, ("a", 1, 2, 3, None, "extra"), {}) is None
    assert bind_call(call, ("a",), {"prompt": "b"}) is None


def test_call_signature_drops_the_bound_instance_and_is_cached_per_function() -> None:
    first = call_signature(functools.partial(_Pipe.__call__, _Pipe()))
    second = call_signature(functools.partial(_Pipe.__call__, _Pipe()))
    assert next(iter(first.parameters)) == "prompt"
    assert first is second


# ---------------------------------------------------------------------------------------
# roles_of: which arguments are per prompt, from the signature


def _roles(cls_name: str) -> Any:
    import diffusers

    return roles_of(inspect.signature(getattr(diffusers, cls_name).__call__))


def test_roles_of_audioldm2_include_its_generated_embeddings_and_masks() -> None:
    roles = _roles("AudioLDM2Pipeline")
    for name in (
        "prompt_embeds",
        "negative_prompt_embeds",
        "generated_prompt_embeds",
        "negative_generated_prompt_embeds",
        "attention_mask",
        "negative_attention_mask",
    ):
        assert name in roles.rows
    assert "transcription" in roles.text
    assert roles.multiplicity == "num_waveforms_per_prompt"


def test_roles_of_stable_audio_leave_its_initial_audio_alone() -> None:
    roles = _roles("StableAudioPipeline")
    assert {"attention_mask", "negative_attention_mask"} <= set(roles.rows)
    assert "initial_audio_waveforms" not in roles.rows
    assert roles.multiplicity == "num_waveforms_per_prompt"


def test_roles_of_video_and_kandinsky_pipelines() -> None:
    assert _roles("WanPipeline").multiplicity == "num_videos_per_prompt"
    assert _roles("AnimateDiffPipeline").multiplicity == "num_videos_per_prompt"
    kandinsky = _roles("KandinskyV22Pipeline")
    assert {"image_embeds", "negative_image_embeds"} <= set(kandinsky.rows)


def test_roles_of_sd_never_cut_adapter_inputs_schedules_or_callback_names() -> None:
    roles = _roles("StableDiffusionPipeline")
    everything = {*roles.text, *roles.rows, *roles.images, *roles.per_image}
    for name in (
        "ip_adapter_image",
        "ip_adapter_image_embeds",
        "timesteps",
        "sigmas",
        "callback_on_step_end_tensor_inputs",
        "output_type",
    ):
        assert name not in everything


def test_roles_of_controlnet_img2img_name_control_image_for_the_controlnets() -> None:
    assert _roles("StableDiffusionControlNetImg2ImgPipeline").control == ("control_image",)
    assert _roles("StableDiffusionControlNetPipeline").control == ("image",)


class _ControlImg2Img:
    def __call__(self, prompt: Any = None, image: Any = None, control_image: Any = None) -> Any:
        return None


class _OldStyle:
    """typing spellings, as older diffusers releases annotate."""

    def __call__(
        self,
        caption: Union[str, List[str]] = "",  # noqa: UP006, UP007
        tags: List[str] = (),  # noqa: UP006 - a list of names, not per prompt
        text_embeds: Optional[Any] = None,  # noqa: UP045
        num_clips_per_prompt: int = 3,
        **kwargs: Any,
    ) -> Any:
        return None


def test_roles_of_typing_spellings_and_the_name_list_fallback() -> None:
    roles = roles_of(inspect.signature(_OldStyle.__call__))
    assert "caption" in roles.text
    assert "tags" not in roles.text
    assert "text_embeds" not in roles.rows  # not annotated as a tensor
    assert "prompt_embeds" in roles.rows  # the fallback, for **kwargs
    assert roles.multiplicity == "num_clips_per_prompt"
    bound = bind_call(functools.partial(_OldStyle.__call__, _OldStyle()), (), {})
    assert bound is not None
    assert bound.num_images_per_prompt == 3


def test_roles_are_derived_once_per_signature() -> None:
    signature = inspect.signature(_OldStyle.__call__)
    assert roles_of(signature) is roles_of(signature)


def test_signatures_made_afresh_do_not_pile_up_in_the_cache() -> None:
    from mps_helpers import _per_prompt

    for _ in range(_per_prompt._CACHE_SIZE + 10):
        roles_of(inspect.signature(_OldStyle.__call__))
    assert len(_per_prompt._roles_cache) <= _per_prompt._CACHE_SIZE


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"image_embeds": torch.zeros(3, 8), "negative_image_embeds": torch.zeros(3, 8)}, 3),
        ({"image_embeds": [torch.zeros(1, 8)] * 2}, 2),
        ({"negative_image_embeds": torch.zeros(2, 8)}, 2),
        ({"prompt": "a", "image_embeds": torch.zeros(3, 8)}, 1),
    ],
)
def test_count_prompts_reads_any_embedding(kwargs: dict[str, Any], expected: int) -> None:
    assert count_prompts(kwargs, _roles("KandinskyV22Pipeline")) == expected


def test_split_cuts_audioldm2_generated_embeddings_and_masks() -> None:
    roles = _roles("AudioLDM2Pipeline")
    kwargs = {
        "prompt_embeds": torch.arange(2.0).reshape(2, 1, 1),
        "generated_prompt_embeds": torch.arange(2.0).reshape(2, 1, 1),
        "attention_mask": torch.ones(2, 4, dtype=torch.long),
        "negative_attention_mask": torch.ones(2, 4, dtype=torch.long),
        "initial_audio_waveforms": torch.zeros(2, 8),  # not an AudioLDM2 argument: shared
        "num_waveforms_per_prompt": 2,
        "generator": [torch.Generator() for _ in range(4)],
    }
    given = {k: v for k, v in kwargs.items() if k != "initial_audio_waveforms"}
    bound = bind_call(functools.partial(_audioldm2_call(), None), (), given)
    assert bound is not None
    assert bound.num_images_per_prompt == 2
    items = split_batch(kwargs, count_prompts(kwargs, roles), num_images_per_prompt=2, roles=roles)
    assert len(items) == 2
    for i, item in enumerate(items):
        assert item["generated_prompt_embeds"].flatten().tolist() == [float(i)]
        assert item["attention_mask"].shape == (1, 4)
        assert item["negative_attention_mask"].shape == (1, 4)
        assert len(item["generator"]) == 2
        assert item["initial_audio_waveforms"] is kwargs["initial_audio_waveforms"]


def test_split_shares_a_derived_embedding_of_another_length() -> None:
    roles = _roles("KandinskyV22Pipeline")
    one = torch.zeros(1, 8)
    items = split_batch(
        {"image_embeds": torch.zeros(2, 8), "negative_image_embeds": one}, 2, roles=roles
    )
    assert all(item["negative_image_embeds"] is one for item in items)
    assert [item["image_embeds"].shape[0] for item in items] == [1, 1]


def _audioldm2_call() -> Any:
    import diffusers

    return diffusers.AudioLDM2Pipeline.__call__


# ---------------------------------------------------------------------------------------
# batch_size


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"prompt": "a cat"}, 1),
        ({"prompt": ["a cat"]}, 1),
        ({"prompt": ["a cat", "a dog", "a fox"]}, 3),
        ({"prompt_embeds": torch.zeros(4, 7, 8)}, 4),
        ({"prompt": None, "prompt_embeds": torch.zeros(2, 7, 8)}, 2),
        ({}, 1),
    ],
)
def test_batch_size(kwargs: dict[str, Any], expected: int) -> None:
    assert batch_size(kwargs) == expected


# ---------------------------------------------------------------------------------------
# split_batch


def test_split_cuts_prompt_lists_and_shares_everything_else() -> None:
    timesteps = [999, 500]
    kwargs = {
        "prompt": ["a", "b"],
        "negative_prompt": ["x", "y"],
        "negative_prompt_2": "shared",
        "timesteps": timesteps,
        "guidance_scale": 7.5,
    }
    items = split_batch(kwargs, 2)
    assert [item["prompt"] for item in items] == [["a"], ["b"]]
    assert [item["negative_prompt"] for item in items] == [["x"], ["y"]]
    for item in items:
        assert item["negative_prompt_2"] == "shared"
        assert item["timesteps"] is timesteps  # a list, but not a per-prompt one
        assert item["guidance_scale"] == 7.5
    assert kwargs["prompt"] == ["a", "b"]  # the caller's dict is left alone


def test_split_cuts_embeddings_along_the_batch_dimension() -> None:
    embeds = torch.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    pooled = torch.arange(2 * 4.0).reshape(2, 4)
    items = split_batch({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}, 2)
    for i, item in enumerate(items):
        assert torch.equal(item["prompt_embeds"], embeds[i : i + 1])
        assert torch.equal(item["pooled_prompt_embeds"], pooled[i : i + 1])


def test_split_cuts_per_image_arguments_into_runs_of_num_images_per_prompt() -> None:
    generators = [torch.Generator().manual_seed(i) for i in range(6)]
    latents = torch.arange(6.0).reshape(6, 1, 1, 1)
    items = split_batch(
        {"prompt": ["a", "b", "c"], "generator": generators, "latents": latents},
        3,
        num_images_per_prompt=2,
    )
    for i, item in enumerate(items):
        assert item["generator"] == generators[2 * i : 2 * i + 2]
        assert item["latents"].flatten().tolist() == [2.0 * i, 2.0 * i + 1]


def test_split_passes_a_single_generator_unchanged() -> None:
    generator = torch.Generator().manual_seed(0)
    items = split_batch({"prompt": ["a", "b"], "generator": generator}, 2)
    assert all(item["generator"] is generator for item in items)


@pytest.mark.parametrize(
    "images",
    [
        pytest.param(lambda: [object(), object()], id="list"),
        pytest.param(lambda: np.zeros((2, 8, 8, 3), dtype=np.float32), id="ndarray"),
        pytest.param(lambda: torch.zeros(2, 3, 8, 8), id="tensor"),
    ],
)
def test_split_cuts_per_prompt_images(images: Any) -> None:
    value = images()
    items = split_batch({"prompt": ["a", "b"], "image": value, "mask_image": value}, 2)
    for i, item in enumerate(items):
        for name in ("image", "mask_image"):
            part = item[name]
            assert len(part) == 1
            assert part[0] is value[i] if isinstance(value, list) else (part == value[i]).all()


def test_split_cuts_a_three_dimensional_mask_batch_but_not_a_single_image() -> None:
    masks = torch.zeros(2, 8, 8)
    image = torch.zeros(3, 8, 8)  # one (channels, height, width) image
    items = split_batch({"prompt": ["a", "b"], "mask_image": masks, "image": image}, 2)
    assert [tuple(item["mask_image"].shape) for item in items] == [(1, 8, 8), (1, 8, 8)]
    assert all(item["image"] is image for item in items)


@pytest.mark.parametrize(
    "single",
    [
        pytest.param(object, id="pil-like"),
        pytest.param(lambda: [object()], id="one-item-list"),
        pytest.param(lambda: np.zeros((8, 8, 3), dtype=np.float32), id="hwc-array"),
        pytest.param(lambda: torch.zeros(1, 3, 8, 8), id="batch-of-one"),
    ],
)
def test_split_gives_a_single_image_to_every_prompt(single: Any) -> None:
    value = single()
    items = split_batch({"prompt": ["a", "b"], "image": value}, 2)
    assert all(item["image"] is value for item in items)


def test_split_gives_a_flat_per_controlnet_list_to_every_prompt() -> None:
    # [net1, net2]: one image per ControlNet, for all prompts (also with 2 prompts, 2 nets)
    images = [object(), object()]
    items = split_batch({"prompt": ["a", "b"], "image": images}, 2, multi_control=2)
    assert all(item["image"] is images for item in items)


def test_split_cuts_each_controlnets_batch_in_a_flat_list() -> None:
    batch = torch.arange(2.0).reshape(2, 1, 1, 1)
    shared = object()
    items = split_batch({"prompt": ["a", "b"], "image": [batch, shared]}, 2, multi_control=2)
    assert [item["image"][1] for item in items] == [shared, shared]
    assert [item["image"][0].tolist() for item in items] == [[[[[0.0]]]], [[[[1.0]]]]]


def test_split_cuts_a_nested_controlnet_list_per_prompt() -> None:
    # [[p1_net1, p1_net2], [p2_net1, p2_net2]], as diffusers reads a nested list
    first, second = [object(), object()], [object(), object()]
    items = split_batch({"prompt": ["a", "b"], "image": [first, second]}, 2, multi_control=2)
    assert [item["image"] for item in items] == [[first], [second]]


def test_split_rejects_a_nested_controlnet_list_of_the_wrong_length() -> None:
    nested = [[object(), object()]] * 3
    with pytest.raises(ValueError, match="image has 3 items but the batch has 2 prompts"):
        split_batch({"prompt": ["a", "b"], "image": nested}, 2, multi_control=2)


def test_split_cuts_control_image_not_the_init_image_of_a_controlnet_img2img() -> None:
    roles = roles_of(inspect.signature(_ControlImg2Img.__call__))
    init = [object(), object()]
    control = [object(), object()]  # one per ControlNet
    items = split_batch(
        {"prompt": ["a", "b"], "image": init, "control_image": control},
        2,
        multi_control=2,
        roles=roles,
    )
    assert [item["image"] for item in items] == [init[:1], init[1:]]
    assert all(item["control_image"] is control for item in items)


@pytest.mark.parametrize(
    ("kwargs", "per_prompt", "lengths"),
    [
        ({"negative_prompt": ["x", "y", "z"]}, 1, ("3", "2")),
        ({"negative_prompt": ["x"]}, 1, ("1", "2")),
        ({"prompt_2": ["x", "y", "z"]}, 1, ("3", "2")),
        ({"negative_prompt_embeds": torch.zeros(3, 4, 8)}, 1, ("3", "2")),
        ({"generator": [torch.Generator()] * 3}, 1, ("3", "2")),
        ({"generator": [torch.Generator()] * 2}, 2, ("2", "4")),
        ({"latents": torch.zeros(3, 4, 8, 8)}, 2, ("3", "4")),
        ({"image": [object()] * 3}, 1, ("3", "2")),
        ({"image": torch.zeros(3, 3, 8, 8)}, 1, ("3", "2")),
    ],
)
def test_split_rejects_mismatched_lengths_naming_both(
    kwargs: dict[str, Any], per_prompt: int, lengths: tuple[str, str]
) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name) as info:
        split_batch({"prompt": ["a", "b"], **kwargs}, 2, num_images_per_prompt=per_prompt)
    message = str(info.value)
    assert f"has {lengths[0]} items" in message
    assert f"batch has {lengths[1]}" in message


def test_split_needs_a_prompt() -> None:
    with pytest.raises(ValueError, match="at least one prompt"):
        split_batch({}, 0)


# ---------------------------------------------------------------------------------------
# merge_values / merge_outputs


@dataclasses.dataclass
class _Output:
    images: Any
    nsfw_content_detected: Any


def test_merge_values_joins_each_kind_of_field() -> None:
    assert merge_values([[1], [2, 3]]) == [1, 2, 3]
    assert merge_values([(1,), (2,)]) == (1, 2)
    assert merge_values([None, None]) is None
    assert merge_values([5, 5]) == 5
    assert merge_values([5, 6]) == [5, 6]
    arrays = merge_values([np.zeros((1, 2)), np.ones((2, 2))])
    assert arrays.shape == (3, 2)
    tensors = merge_values([torch.zeros(1, 2), torch.ones(1, 2)])
    assert isinstance(tensors, torch.Tensor)
    assert tensors.tolist() == [[0.0, 0.0], [1.0, 1.0]]


def test_merge_outputs_keeps_the_output_class() -> None:
    merged = merge_outputs([_Output([1], [False]), _Output([2], [True])])
    assert merged == _Output([1, 2], [False, True])
    none = merge_outputs([_Output(np.zeros((1, 2)), None), _Output(np.zeros((1, 2)), None)])
    assert isinstance(none, _Output)
    assert none.nsfw_content_detected is None
    assert none.images.shape == (2, 2)


def test_merge_outputs_keeps_tuples_and_mappings() -> None:
    assert merge_outputs([([1], None), ([2], None)]) == ([1, 2], None)
    merged = merge_outputs([OrderedDict(images=[1]), OrderedDict(images=[2])])
    assert merged == OrderedDict(images=[1, 2])
    assert type(merged) is OrderedDict


def test_merge_outputs_of_one_is_that_output() -> None:
    only = _Output([1], None)
    assert merge_outputs([only]) is only


def test_merge_outputs_needs_outputs() -> None:
    with pytest.raises(ValueError, match="no outputs"):
        merge_outputs([])
