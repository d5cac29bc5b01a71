"""The start-up warning when other work already keeps the machine's CPUs busy."""

from __future__ import annotations

import pytest

from services.resources import busy_cpu_warning

pytestmark = pytest.mark.unit


def test_an_idle_machine_gets_no_warning() -> None:
    assert busy_cpu_warning(10.0, 2) is None
    assert busy_cpu_warning(74.9, 2) is None


def test_a_busy_machine_is_named_with_the_cause_and_the_fix() -> None:
    msg = busy_cpu_warning(96.0, 2)
    assert msg is not None
    assert "2 CPU(s)" in msg and "96% busy" in msg
    assert "lower priority" in msg and "renice" in msg
