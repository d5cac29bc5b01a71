"""The OCR reward (rewards/ocr.py): reads back text the test renders, scores by edit distance
to the quoted target as flow_grpo does, and marks prompts without a target invalid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from rewards.ocr import edit_distance, ocr_reward, target_text

pytestmark = pytest.mark.integration


def _render(text: str) -> np.ndarray:
    img = Image.new("RGB", (256, 64), "white")
    ImageDraw.Draw(img).text((10, 10), text, fill="black", font=ImageFont.load_default(size=36))
    return np.asarray(img)


def test_the_score_is_flow_grpos_edit_distance_rule() -> None:
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3
    assert target_text('a neon sign that says "OPEN late"') == "OPEN late"
    assert target_text("a cat") is None
    assert ocr_reward("open LATE", "OPEN late") == 1.0  # spaces and case ignored
    assert ocr_reward("opex", "open") == pytest.approx(0.75)
    assert ocr_reward("", "open") == 0.0 and ocr_reward("a much longer text", "ab") == 0.0


def test_rendered_text_is_read_back() -> None:
    from rewards.base import build_reward

    reward = build_reward("ocr")
    images = np.stack([_render("HELLO RAY"), _render("HELLO RAY"), _render("HELLO RAY")])
    prompts = ['a sign that says "HELLO RAY"', 'a sign that says "GOODBYE"', "a sign"]
    out = reward.score(images, prompts)
    assert out.scores[0] == 1.0 and out.details[0]["read"].replace(" ", "") == "HELLORAY"
    assert 0.0 <= out.scores[1] < 0.5
    assert np.isnan(out.scores[2])  # no quoted target: an invalid sample, not a zero
