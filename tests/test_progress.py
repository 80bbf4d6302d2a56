"""Tests of the prepared call's progress bars: sub-pipelines silenced, configs restored."""

from __future__ import annotations

from typing import Any

import pytest

from mps_helpers._progress import progress_config, prompt_progress, sub_pipelines


class _Pipe:
    """A pipeline stand-in with diffusers' progress-bar config."""

    def __init__(self, **config: Any) -> None:
        self.components: dict[str, Any] = {}
        if config:
            self._progress_bar_config = config

    def set_progress_bar_config(self, **config: Any) -> None:
        self._progress_bar_config = config

    def progress_bar(self, iterable: Any = None, total: Any = None) -> None:
        raise AssertionError("the library must not call a pipeline's progress_bar")


class _Combined(_Pipe):
    """Like Kandinsky 2.2's combined pipeline: the configs live on its prior and decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.prior_pipe = _Pipe(desc="prior")
        self.decoder_pipe = _Pipe(desc="decoder")


def test_sub_pipelines_are_the_pipelines_a_pipeline_holds() -> None:
    combined = _Combined()
    assert sub_pipelines(combined) == [combined.prior_pipe, combined.decoder_pipe]
    assert sub_pipelines(_Pipe()) == []


def test_progress_config_silences_sub_pipelines_and_restores_every_config() -> None:
    combined = _Combined()
    with progress_config(combined, disable=True) as own:
        assert own == {"desc": "prior"}  # a combined pipeline's own is its first stage's
        assert combined.prior_pipe._progress_bar_config == {"desc": "prior", "disable": True}
        assert combined.decoder_pipe._progress_bar_config["disable"] is True
    assert not hasattr(combined, "_progress_bar_config")
    assert combined.prior_pipe._progress_bar_config == {"desc": "prior"}
    assert combined.decoder_pipe._progress_bar_config == {"desc": "decoder"}


def test_progress_config_restores_even_when_the_block_raises() -> None:
    pipe = _Pipe(desc="mine")
    with pytest.raises(RuntimeError), progress_config(pipe, disable=True):
        raise RuntimeError
    assert pipe._progress_bar_config == {"desc": "mine"}


def test_prompt_progress_is_the_librarys_own_bar(capsys: pytest.CaptureFixture[str]) -> None:
    combined = _Combined()
    with prompt_progress(combined, 3) as bar:
        assert combined.decoder_pipe._progress_bar_config["disable"] is True
        bar.update(3)
    err = capsys.readouterr().err
    assert "prior" in err  # the config of the combined pipeline's first stage
    assert "3/3" in err
    assert "prompt" in err
    with prompt_progress(_Pipe(disable=True), 2) as bar:
        bar.update(2)
    assert capsys.readouterr().err == ""
