"""The OCR reward (flow_grpo's ``ocr.py``, on RapidOCR): does the image show the text the
prompt asks for?

Component layer. The target is the text between the first pair of double quotes in the prompt
(``a sign that says "OPEN"``); the reward is ``1 - min(d, n) / n`` for the edit distance ``d``
between what is read and the target (``n`` characters), spaces and case ignored, as flow_grpo
scores it. RapidOCR (``pip install elborl[ocr]``, ``rapidocr-onnxruntime``) ships its PP-OCRv4
ONNX models in the wheel, so nothing is downloaded; flow_grpo's PaddleOCR reads with another
recogniser, so scores differ slightly from its. Text needs about 32 px of height to be read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from rewards.base import Reward, RewardOutput, register

QUOTED = re.compile(r'"([^"]+)"')


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def target_text(prompt: str) -> str | None:
    """The text between the first pair of double quotes, or None."""
    match = QUOTED.search(prompt)
    return match.group(1) if match else None


def _normal(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def ocr_reward(read: str, target: str) -> float:
    """``1 - min(edit distance, len) / len`` on the texts without spaces, lower-cased."""
    got, want = _normal(read), _normal(target)
    if not want:
        return float("nan")
    return 1.0 - min(edit_distance(got, want), len(want)) / len(want)


@register("ocr")
class OcrReward(Reward):
    """Text rendering accuracy; prompts without a quoted target score NaN (invalid)."""

    name = "ocr"
    range = (0.0, 1.0)

    def __init__(self, min_side: int = 0):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as exc:
            raise ValueError(
                "reward 'ocr' needs RapidOCR: pip install 'elborl[ocr]' (rapidocr-onnxruntime)"
            ) from exc
        self.engine: Any = RapidOCR()
        self.min_side = min_side

    def read(self, image: np.ndarray) -> str:
        """The text read in ``image`` (uint8 (H, W, 3)), left to right, top to bottom."""
        if self.min_side and min(image.shape[:2]) < self.min_side:
            from PIL import Image

            scale = self.min_side / min(image.shape[:2])
            size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
            image = np.asarray(Image.fromarray(image).resize(size))
        result, _ = self.engine(image)
        boxes = sorted(result or [], key=lambda r: (r[0][0][1] // 16, r[0][0][0]))
        return " ".join(r[1] for r in boxes)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        self.check_batch(images, prompts)
        scores, details = [], []
        for image, prompt in zip(images, prompts, strict=True):
            target = target_text(prompt)
            read = self.read(image) if target is not None else ""
            scores.append(ocr_reward(read, target) if target is not None else float("nan"))
            details.append({"read": read, "target": target})
        return RewardOutput(scores=np.array(scores, dtype=np.float64), details=details)
