"""Which device an engine runs on (policy/placement.py) and where a policy's parts go."""

from __future__ import annotations

import os

import pytest
import torch

from policy.placement import resolve_device

pytestmark = pytest.mark.unit


def test_cpu_is_always_the_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cpu", has_gpus=True) == torch.device("cpu")


def test_auto_takes_a_gpu_only_where_one_was_given() -> None:
    # An actor Ray gave no GPU stays on the CPU even where CUDA is visible.
    assert resolve_device("auto", has_gpus=False) == torch.device("cpu")
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device("auto", has_gpus=True) == torch.device(expected)


def test_cuda_without_a_gpu_names_the_settings() -> None:
    with pytest.raises(ValueError, match="num_gpus"):
        resolve_device("cuda", has_gpus=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"model\.device=auto"):
            resolve_device("cuda")


def test_unknown_setting() -> None:
    with pytest.raises(ValueError, match="allowed: auto, cpu, cuda"):
        resolve_device("tpu")


def test_an_actor_given_no_gpu_sees_none(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.actors import hide_unassigned_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    hide_unassigned_gpus([3])  # given one: Ray has set the variable to it; left alone
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    hide_unassigned_gpus([])
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
