"""Joining or starting the Ray cluster, and telling whether it is still there."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from services.errors import ClusterLost
from services.resources import busy_cpu_warning

log = logging.getLogger("elborl.driver")
_RAY_PROCESSES = ("raylet", "gcs_server")


@contextmanager
def ray_session(address: str | None) -> Iterator[bool]:
    """Join ``address``/``RAY_ADDRESS`` or start a local cluster; shut down what we started.

    Yields whether this process started the cluster (local mode).
    """
    if ray.is_initialized():
        yield False
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target, log_to_driver=True)
    else:
        import psutil

        busy = busy_cpu_warning(psutil.cpu_percent(interval=0.3), os.cpu_count() or 1)
        if busy:
            log.warning(busy)
        ray.init(  # "local": a new cluster even when `ray start` runs on this machine
            address="local",
            num_cpus=os.cpu_count(),
            object_store_memory=int(os.environ.get("ELBORL_OBJECT_STORE_BYTES", 512 * 2**20)),
            include_dashboard=False,
            log_to_driver=True,
        )
    try:
        yield not target
    finally:
        ray.shutdown()


def check_cluster(local: bool, timeout: float = 5.0) -> None:
    """Raise ``ClusterLost`` unless the cluster answers within ``timeout`` seconds.

    A cluster this process started (``local``) is gone when its raylet or GCS process is;
    any cluster is gone when its GCS does not list a live node in time.
    """
    if local:
        import psutil

        names = set()
        for p in psutil.Process().children(recursive=True):
            try:
                if p.status() != psutil.STATUS_ZOMBIE:  # killed but not yet reaped: gone
                    names.add(p.name())
            except psutil.NoSuchProcess:
                continue
        missing = [n for n in _RAY_PROCESSES if not any(n in name for name in names)]
        if missing:
            raise ClusterLost(f"the local Ray cluster's {', '.join(missing)} process is gone")
    answer: list[object] = []
    probe = threading.Thread(target=lambda: answer.append(_alive_nodes()), daemon=True)
    probe.start()
    probe.join(timeout)
    if not answer or isinstance(answer[0], BaseException) or answer[0] == 0:
        raise ClusterLost(f"the Ray cluster is gone (no answer within {timeout:.0f} s)")


def _alive_nodes() -> int | BaseException:
    try:
        return sum(bool(n.get("Alive")) for n in ray.nodes())
    except BaseException as exc:  # the GCS is gone: any error means "no answer"
        return exc
