"""One group object per role on the driver side (OpenRLHF's ``RayActorGroup``).

A ``RoleGroup`` starts its role's actors with the role's resources, waits until they are
up (their node ids), replaces a dead one within the run's restart budget and only where a
live node can hold it, and reports its health from its own bookkeeping: how many actors it
holds, how many it has seen die without a replacement yet, how many it replaced, and the
nodes they ran on. Methods that return ObjectRefs say so (``*_refs``); the others block.

``RolloutGroup`` also keeps the published weights, so a replacement rollout worker loads
the same weights (checksum checked) before it takes work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError

from common.config import Resources
from services.config import ConfigError
from services.errors import RunStopped
from services.resources import missing_for

log = logging.getLogger("elborl.driver")


def actor_options(res: Resources) -> dict[str, Any]:
    """``ray.remote`` options of one actor of a role."""
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.custom:
        opts["resources"] = dict(res.custom)
    return opts


def get_or_stop(ref: Any, timeout: float, what: str) -> Any:
    """``ray.get`` that turns a timeout into ``RunStopped`` naming what was awaited."""
    try:
        return ray.get(ref, timeout=timeout)
    except GetTimeoutError as exc:
        raise RunStopped(f"{what} did not answer within {timeout:.0f} s") from exc


class RoleGroup:
    """The actors of one role.

    Args:
        role: its name in messages and metrics (``rollout``, ``reward``, ``learner``).
        cls: the plain actor class (``services.actors``); made a Ray actor here.
        resources: what one actor reserves.
        args: the constructor's arguments for actor ``i``.
        count: how many actors.
        max_restarts: replacements allowed over the whole run (``faults.max_restarts``).
        timeout: longest wait for one actor to start, seconds.
    """

    def __init__(
        self,
        role: str,
        cls: type,
        resources: Resources,
        args: Callable[[int], Sequence[Any]],
        count: int,
        max_restarts: int,
        timeout: float,
    ):
        self.role, self.resources, self.args = role, resources, args
        self.remote_cls: Any = ray.remote(cls).options(**actor_options(resources))
        self.max_restarts, self.timeout = max_restarts, timeout
        self.actors: list[Any] = [self.remote_cls.remote(*args(i)) for i in range(count)]
        self.restarts = 0
        self.dead: set[int] = set()  # actors seen dead and not replaced (yet)
        self.nodes: list[str] = []

    def __len__(self) -> int:
        return len(self.actors)

    def __getitem__(self, i: int) -> Any:
        return self.actors[i]

    def node_refs(self) -> list[ray.ObjectRef]:
        return [a.node_id.remote() for a in self.actors]

    def mark_dead(self, i: int) -> None:
        """Record that actor ``i`` died (a call on it raised ``RayActorError``)."""
        self.dead.add(i)

    def replace(self, i: int) -> Any:
        """A new actor in slot ``i`` once the restart budget and the live nodes allow it."""
        self.mark_dead(i)
        if self.restarts >= self.max_restarts:
            raise RunStopped(
                f"{self.role} actors died {self.restarts + 1} times, more than "
                f"faults.max_restarts = {self.max_restarts}"
            )
        missing = missing_for(self.role, self.resources)
        if missing:
            raise RunStopped(missing)
        actor = self.remote_cls.remote(*self.args(i))
        node = get_or_stop(actor.node_id.remote(), self.timeout, f"a replacement {self.role} actor")
        self.restarts += 1
        self.nodes.append(node)
        self.actors[i] = actor
        self.dead.discard(i)
        log.warning(
            "%s actor %d replaced (%d of %d allowed)",
            self.role,
            i,
            self.restarts,
            self.max_restarts,
        )
        return actor

    def health(self) -> dict[str, Any]:
        """``num_workers``, ``alive``, ``restarts`` and ``nodes`` from this group's records."""
        return {
            "num_workers": len(self.actors),
            "alive": len(self.actors) - len(self.dead),
            "restarts": self.restarts,
            "nodes": sorted(set(self.nodes)),
        }


class RolloutGroup(RoleGroup):
    """Rollout workers, and the weights a replacement must load before it takes work."""

    state_ref: Any = None
    version = -1
    checksum = ""

    def replace(self, i: int) -> Any:
        actor = super().replace(i)
        if self.state_ref is not None:
            report = get_or_stop(
                actor.load_weights.remote(self.state_ref, self.version),
                self.timeout,
                "weight load",
            )
            if report.checksum != self.checksum:
                raise RuntimeError(
                    "a replacement rollout worker loaded weights with a wrong checksum"
                )
        log.warning("rollout worker %d now holds weights version %d", i, self.version)
        return actor


def wait_ready(groups: Sequence[RoleGroup], timeout: float) -> None:
    """Every actor of every group alive (its node recorded), or a clear error in time."""
    try:
        for g in groups:
            g.nodes = list(ray.get(g.node_refs(), timeout=timeout))
    except GetTimeoutError as exc:
        raise ConfigError(
            f"actors did not start within {timeout:.0f} s; the cluster has "
            f"{ray.available_resources()} free. Lower the roles' resources in the config"
        ) from exc
