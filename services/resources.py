"""Fail fast when the cluster cannot hold the configured roles (instead of hanging)."""

from __future__ import annotations

from typing import Any

import ray

from services.config import ConfigError, Resources, RunConfig


def busy_cpu_warning(busy_percent: float, num_cpus: int, threshold: float = 75.0) -> str | None:
    """A warning when other work keeps this machine's CPUs busy before a local run starts.

    Ray runs its worker processes at a lower priority (niced), so a CPU-bound job at normal
    priority can starve the run's actors completely: the run looks hung, with no error.
    ``busy_percent`` is the machine-wide CPU use sampled just before Ray starts.
    """
    if busy_percent < threshold:
        return None
    return (
        f"the machine's {num_cpus} CPU(s) are already {busy_percent:.0f}% busy with other work; "
        "Ray's workers run at a lower priority and may be starved (the run would look hung). "
        "Stop or renice the other job, or expect a slow run"
    )


def _bundle(res: Resources) -> dict[str, float]:
    out = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.custom}
    return {k: v for k, v in out.items() if v > 0}


def role_bundles(cfg: RunConfig) -> list[tuple[str, dict[str, float]]]:
    """One (role, resource bundle) per actor the run starts."""
    roles = [
        ("rollout", cfg.rollout.resources, cfg.rollout.num_workers),
        ("reward", cfg.rewards.resources, cfg.rewards.num_actors),
        ("learner", cfg.learner.resources, cfg.learner.num_workers),
    ]
    return [(name, _bundle(res)) for name, res, count in roles for _ in range(count)]


def check_resources(cfg: RunConfig) -> None:
    """Raise ``ConfigError`` naming the role and the missing resource if placement is impossible.

    Two checks against the live cluster: every single actor fits on at least one node, and the
    totals fit the cluster (first-fit over nodes, largest bundles first).
    """
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    free = [dict(n) for n in nodes]
    for role, bundle in sorted(role_bundles(cfg), key=lambda rb: -sum(rb[1].values())):
        if not any(_fits(bundle, n) for n in nodes):
            raise ConfigError(_message(role, bundle, nodes, "no node has that much"))
        node = next((n for n in free if _fits(bundle, n)), None)
        if node is None:
            raise ConfigError(_message(role, bundle, nodes, "the other roles already use it"))
        for k, v in bundle.items():
            node[k] -= v


def _fits(bundle: dict[str, float], node: dict[str, Any]) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())


def _message(role: str, bundle: dict[str, float], nodes: list[dict[str, Any]], why: str) -> str:
    have = [{k: v for k, v in n.items() if k in ("CPU", "GPU") or k in bundle} for n in nodes]
    return (
        f"cannot place a {role} actor needing {bundle}: {why}. The cluster's nodes offer {have}. "
        f"Lower {role}'s resources (num_cpus / num_gpus / custom) or the number of {role} "
        "actors in the config, or add nodes."
    )


def missing_for(role: str, res: Resources) -> str | None:
    """Why no live node can ever hold one more ``role`` actor (None if one can).

    Checked before replacing an actor lost with its node: Ray would otherwise queue the
    replacement until a node with those resources appears, which may be never.
    """
    bundle = _bundle(res)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if any(_fits(bundle, n) for n in nodes):
        return None
    have = [{k: v for k, v in n.items() if k in ("CPU", "GPU") or k in bundle} for n in nodes]
    return (
        f"no live node can hold a replacement {role} actor needing {bundle}; the live nodes "
        f"offer {have}. Add a node with those resources and resume, or lower {role}'s resources"
    )
