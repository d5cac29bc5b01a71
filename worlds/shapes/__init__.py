"""The built-in `shapes` world: a GenEval in miniature that needs nothing downloaded.

``grammar`` defines the prompts and the fixed train / held-out split, ``render`` draws
correct images (to pretrain the base policy), ``verify`` scores any image clause by clause
(the reward) and ``summarize`` turns verdicts into GenEval-style accuracy.
"""

from worlds.shapes.grammar import (
    COLOURS,
    PALETTE,
    RELATIONS,
    SHAPES,
    CountPrompt,
    ObjectSpec,
    RelationPrompt,
    ShapesPrompt,
    all_prompts,
    heldout_prompts,
    load_prompt_file,
    parse_prompt,
    split_prompts,
    train_prompts,
)
from worlds.shapes.render import render, render_batch
from worlds.shapes.verify import DetectedObject, VerifyResult, summarize, verify, verify_batch

__all__ = [
    "COLOURS",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "CountPrompt",
    "DetectedObject",
    "ObjectSpec",
    "RelationPrompt",
    "ShapesPrompt",
    "VerifyResult",
    "all_prompts",
    "heldout_prompts",
    "load_prompt_file",
    "parse_prompt",
    "render",
    "render_batch",
    "split_prompts",
    "summarize",
    "train_prompts",
    "verify",
    "verify_batch",
]
