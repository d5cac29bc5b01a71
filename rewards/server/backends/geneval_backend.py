"""Skeleton: GenEval (Ghosh et al. 2023) behind ``elborl_reward_server.py``.

Not runnable as shipped: GenEval needs mmdet/mmcv built against its own torch and the
Mask2Former and CLIP weights, which elborl's environment does not have. Copy this file and the
server into GenEval's environment and fill in the marked places (from GenEval's
``evaluation/evaluate_images.py``), then::

    ELBORL_REWARD_TOKEN=... python elborl_reward_server.py \\
        --backend geneval_backend.py:GenEval --weights /models/geneval --port 18091

Requests carry GenEval's per-prompt metadata (``test_metadata.jsonl``: ``tag``, ``include``
with ``class``, ``count``, ``color``, ``position``), one object per image.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class GenEval:
    name = "geneval"
    range = (0.0, 1.0)
    max_batch = 32
    needs_metadata = True
    version = "geneval-mask2former"

    def load(self, directory: str | None) -> None:
        if directory is None:
            raise SystemExit("geneval: pass --weights DIR (the detector config and checkpoint)")
        # HERE: build the detector and the colour classifier, as evaluate_images.py does:
        #   self.detector = init_detector(config_path, checkpoint_path, device="cuda:0")
        #   self.clip, self.transform = open_clip.create_model_and_transforms(...)
        raise NotImplementedError("fill in GenEval's model loading (see the module docstring)")

    def score(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]] | None
    ) -> tuple[list[float | None], list[dict[str, Any]]]:
        assert metadata is not None  # needs_metadata: the server refuses requests without it
        scores: list[float | None] = []
        details: list[dict[str, Any]] = []
        for _image, meta in zip(images, metadata, strict=True):
            # HERE: detections = inference_detector(self.detector, _image[..., ::-1])
            #       passed, reason = evaluate(_image, detections, meta)  # GenEval's rule
            passed, reason = False, "not implemented"
            scores.append(float(passed))  # strict: 1 if the image satisfies the whole prompt
            details.append({"passed": passed, "reason": reason, "tag": meta.get("tag")})
        return scores, details
