"""A stand-in's pretraining process killed (SIGKILL, as the OOM killer would): the demo says so in words,
keeps the data it had made, leaves no stand-in that looks finished, and the next demo makes both."""

from __future__ import annotations

import shutil

import pytest

from advcap.errors import AdvcapError

pytestmark = pytest.mark.slow


def test_a_killed_stand_in_process_is_a_clear_error_and_the_next_demo_finishes_the_stand_ins(tmp_path, monkeypatch):
    import advcap.demo as demo

    settings = {**demo.DEMO_SETTINGS, "images": 40, "vit_pretrain_steps": 4, "gpt2_pretrain_steps": 4}
    out = tmp_path / "demo"
    # Side by side (one spawned process per stand-in) needs two cores; say there are two wherever this runs.
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    monkeypatch.setenv("ADVCAP_FAULTS", "pretrain.step=kill@step=2")  # both processes die at their 2nd step
    with pytest.raises(AdvcapError, match="a process pretraining a stand-in died .*what was finished is kept"):
        demo.prepare_data(out, settings)
    assert (out / "data" / "shards" / "manifest.json").is_file()
    assert (out / "data" / "tokenizer" / "tokenizer.json").is_file()
    assert not (out / "pretrained" / "vit" / "config.json").exists()
    assert not (out / "pretrained" / "gpt2" / "config.json").exists()

    monkeypatch.delenv("ADVCAP_FAULTS")
    demo.prepare_data(out, settings)
    assert (out / "pretrained" / "vit" / "config.json").is_file()
    assert (out / "pretrained" / "gpt2" / "config.json").is_file()


def test_a_stand_in_made_on_resume_is_the_one_an_uninterrupted_demo_makes(tmp_path, monkeypatch):
    """A stand-in's weights depend on its torch thread count: the one job left on resume gets one thread, as
    each of the two jobs of an uninterrupted demo does, whatever this process's thread count."""
    import torch

    import advcap.demo as demo

    settings = {**demo.DEMO_SETTINGS, "images": 40, "vit_pretrain_steps": 6, "gpt2_pretrain_steps": 6}
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    whole = tmp_path / "whole"
    demo.prepare_data(whole, settings)
    resumed = tmp_path / "resumed"
    demo.prepare_data(resumed, settings)
    for stand_in in ("vit", "gpt2"):  # as if the demo had been killed before this one was saved
        shutil.rmtree(resumed / "pretrained" / stand_in)
        threads = torch.get_num_threads()
        torch.set_num_threads(2)  # this process's share of a two-core machine, unlike the tests' one thread
        try:
            demo.prepare_data(resumed, settings)
        finally:
            torch.set_num_threads(threads)
        weights = "model.safetensors"
        assert ((resumed / "pretrained" / stand_in / weights).read_bytes()
                == (whole / "pretrained" / stand_in / weights).read_bytes()), stand_in
