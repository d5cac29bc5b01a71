"""Which torch device an engine runs on (component layer; no Ray).

Ray gives an actor with ``num_gpus > 0`` its GPUs through ``CUDA_VISIBLE_DEVICES`` (the first
is ``cuda:0`` inside the actor); the actor says whether it was given any
(``ray.get_gpu_ids()``), so a role without GPUs stays on the CPU even on a GPU node.
"""

from __future__ import annotations

import torch


def resolve_device(setting: str, has_gpus: bool | None = None) -> torch.device:
    """``model.device`` (``auto``, ``cpu`` or ``cuda``) as a device for this process.

    ``has_gpus``: whether the scheduler gave this process GPUs (a Ray actor's
    ``bool(ray.get_gpu_ids())``); None outside Ray, where any visible GPU counts.
    """
    visible = torch.cuda.is_available()
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "auto":
        use = visible and (has_gpus is None or has_gpus)
        return torch.device("cuda:0" if use else "cpu")
    if setting == "cuda":
        if not visible or has_gpus is False:
            raise ValueError(
                "model.device = cuda, but no GPU was given to this process: give the role "
                "GPUs (rollout.resources.num_gpus / learner.resources.num_gpus > 0) on a node "
                "with CUDA, or set model.device=auto"
            )
        return torch.device("cuda:0")
    raise ValueError(f"model.device = {setting!r}; allowed: auto, cpu, cuda")
