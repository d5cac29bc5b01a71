"""The KubeRay jobs in deploy/kuberay/ agree with the configs they run: the entrypoint's config
(with its ``--set`` overrides) validates; the GPUs and CPUs the roles reserve fit the pods'
limits; custom resources that pin a role are offered; every path the run reads or writes lies
on a volume mounted where the reading process runs; a remote reward's loopback URL is served
by a container of the pod its callers run in, with the same token file. (No cluster runs
here: this is what can be checked without one.)"""

from __future__ import annotations

import json
import shlex
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from services.config import RunConfig, load_config
from tests.conftest import REPO

pytestmark = pytest.mark.unit

JOBS = sorted((REPO / "deploy" / "kuberay").glob("rayjob*.yaml"))


def _config(job: dict[str, Any]) -> RunConfig:
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["elborl", "train"], argv
    config = argv[argv.index("--config") + 1]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return load_config(str(REPO / config), sets)


def _pods(job: dict[str, Any]) -> list[tuple[str, dict[str, Any], int]]:
    """(group, pod spec, replicas) for the head and every worker group."""
    spec = job["spec"]["rayClusterSpec"]
    pods = [("head", spec["headGroupSpec"], 1)]
    pods += [(g["groupName"], g, int(g["replicas"])) for g in spec.get("workerGroupSpecs", [])]
    return pods


def _ray_container(group: dict[str, Any]) -> dict[str, Any]:
    containers = group["template"]["spec"]["containers"]
    ray = [c for c in containers if c["name"].startswith("ray-")]
    assert len(ray) == 1, [c["name"] for c in containers]
    return ray[0]


def _ray_resources(group: dict[str, Any]) -> dict[str, float]:
    """What Ray offers on one pod of the group: its container's limits, unless rayStartParams
    say otherwise (num-cpus, num-gpus, custom resources)."""
    params = group.get("rayStartParams", {})
    limits = _ray_container(group).get("resources", {}).get("limits", {})
    offered = {
        "CPU": float(params.get("num-cpus", limits.get("cpu", 0))),
        "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
    }
    if "resources" in params:  # KubeRay's quoting: a JSON object inside a quoted string
        offered |= {k: float(v) for k, v in json.loads(json.loads(params["resources"])).items()}
    return offered


def _mounted(container: dict[str, Any], path: str) -> bool:
    return any(
        PurePosixPath(path).is_relative_to(m["mountPath"])
        for m in container.get("volumeMounts", [])
    )


def _roles(cfg: RunConfig) -> list[tuple[str, int, Any]]:
    return [
        ("rollout", cfg.rollout.num_workers, cfg.rollout.resources),
        ("learner", cfg.learner.num_workers, cfg.learner.resources),
        ("rewards", cfg.rewards.num_actors, cfg.rewards.resources),
    ]


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_the_roles_fit_the_pods(path: Path) -> None:
    job = yaml.safe_load(path.read_text())
    cfg = _config(job)
    pods = _pods(job)
    total: dict[str, float] = {}
    for _, group, replicas in pods:
        for k, v in _ray_resources(group).items():
            total[k] = total.get(k, 0.0) + replicas * v
    need = {"CPU": 0.0, "GPU": 0.0}
    for _, n, res in _roles(cfg):
        need["CPU"] += n * res.num_cpus
        need["GPU"] += n * res.num_gpus
        for k, v in res.custom.items():
            need[k] = need.get(k, 0.0) + n * v
    for k, v in need.items():
        assert v <= total.get(k, 0.0), f"{path.name}: the roles reserve {v} {k}, pods offer {total}"
    # A whole-GPU role must find whole GPUs on one pod: no pod may offer fewer than it asks.
    for role, _n, res in _roles(cfg):
        if res.num_gpus >= 1:
            per_pod = max(_ray_resources(g)["GPU"] for _, g, _ in pods)
            assert res.num_gpus <= per_pod, role


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_every_path_the_run_uses_is_on_a_mounted_volume(path: Path) -> None:
    job = yaml.safe_load(path.read_text())
    cfg = _config(job)
    paths = [cfg.runs_dir]
    if cfg.model.path:
        paths.append(cfg.model.path)
    for name in ("train_prompts", "eval_prompts"):
        value = getattr(cfg.world, name, None)
        if isinstance(value, str) and value.startswith("/"):
            paths.append(value)
    for group_name, group, _ in _pods(job):
        ray = _ray_container(group)
        for p in paths:
            if group_name != "head" or p == cfg.runs_dir:  # the head writes the run dir only
                assert _mounted(ray, p), f"{path.name}: {p} is not mounted in {group_name}"


@pytest.mark.parametrize("path", JOBS, ids=lambda p: p.name)
def test_loopback_reward_servers_run_beside_their_callers(path: Path) -> None:
    """A ``remote`` reward at 127.0.0.1:PORT is called by the reward actors (training) and the
    driver (eval.rewards). Both must run in a pod with a container listening on PORT, and its
    token file must be mounted in the caller's container and the server's."""
    job = yaml.safe_load(path.read_text())
    cfg = _config(job)
    specs = [*cfg.rewards.functions, *cfg.eval.rewards]
    remote = [s for s in specs if s.name == "remote"]
    if not remote:
        pytest.skip(f"{path.name} has no remote reward")
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    # The reward actors are pinned to the head by a custom resource only the head offers.
    pinned = set(cfg.rewards.resources.custom)
    assert pinned and pinned <= set(_ray_resources(head)) - {"CPU", "GPU"}
    for _, group, _ in _pods(job)[1:]:
        assert not pinned & set(_ray_resources(group)), "the actors could land off the head"
    containers = head["template"]["spec"]["containers"]
    for spec in remote:
        url = urlsplit(spec.params["url"])
        assert url.hostname == "127.0.0.1", "a loopback URL: requests stay in the pod"
        servers = [c for c in containers if str(url.port) in c.get("command", [])]
        assert len(servers) == 1, f"no container in the head pod serves port {url.port}"
        server = servers[0]
        command = server["command"]
        assert command[command.index("--host") + 1] == "127.0.0.1"
        token = spec.params["token_file"]
        assert command[command.index("--token-file") + 1] == token
        assert _mounted(server, token) and _mounted(_ray_container(head), token)
