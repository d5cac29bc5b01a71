"""Fixtures of the integration tests."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="session")
def one_rank() -> Iterator[None]:
    """A one-rank torch.distributed environment on loopback (for LearnerEngines in-process).

    Session-wide: DeepSpeed keeps the first process group it sees, so a second group in the
    same process (after destroying the first) is not one it knows.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    saved = {k: os.environ.get(k) for k in [*env, "MASTER_PORT"]}
    os.environ.update({**env, "MASTER_PORT": str(port)})
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
