"""Skeleton: HPSv2.1 (Wu et al. 2023) behind ``elborl_reward_server.py``.

Not runnable as shipped: the ``hpsv2`` package pins protobuf < 4 and needs open_clip with
torchvision, which elborl's environment does not have, and the HPS_v2.1 checkpoint. Copy this
file and the server into an environment with ``pip install hpsv2x``, fill in the marked
places, then::

    ELBORL_REWARD_TOKEN=... python elborl_reward_server.py \\
        --backend hpsv2_backend.py:HPSv2 --weights /models/hpsv2.1 --port 18092
"""

from __future__ import annotations

from typing import Any

import numpy as np


class HPSv2:
    name = "hpsv2"
    range = (0.0, 1.0)  # HPSv2.1 scores lie around 0.2-0.35; CLIP cosine similarity, <= 1
    max_batch = 32
    version = "HPS_v2.1_compressed"

    def load(self, directory: str | None) -> None:
        if directory is None:
            raise SystemExit("hpsv2: pass --weights DIR (HPS_v2.1_compressed.pt)")
        # HERE: as hpsv2/img_score.py does:
        #   self.model, _, self.preprocess = create_model_and_transforms("ViT-H-14", ...)
        #   ckpt = torch.load(f"{directory}/HPS_v2.1_compressed.pt")
        #   self.model.load_state_dict(ckpt["state_dict"])
        #   self.tokenizer = get_tokenizer("ViT-H-14"); self.model.eval().to("cuda")
        raise NotImplementedError("fill in HPSv2's model loading (see the module docstring)")

    def score(
        self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]] | None
    ) -> list[float | None]:
        # HERE: pixels = torch.stack([self.preprocess(Image.fromarray(i)) for i in images])
        #       text = self.tokenizer(prompts)
        #       out = self.model(pixels.cuda(), text.cuda())
        #       scores = (out["image_features"] * out["text_features"]).sum(-1)
        raise NotImplementedError("fill in HPSv2's scoring (see the module docstring)")
