"""``elborl export``: a run's trained policy, written where its family's own tools load it.

The trained (current) weights come from a complete run checkpoint (the learner's DeepSpeed
state); the base comes from the run's config (``model.path`` or ``model.checkpoint``). The
model kind writes the files (``ModelKind.export``): a saved policy for ``tiny``, diffusers'
LoRA format (or the merged transformer) for ``sd3``. A model card (``README.md``) and the
run's config (``elborl_config.yaml``) go beside them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from services.config import ConfigError, RunConfig, config_to_yaml
from services.run import COMPLETE, latest_complete, verify_checkpoint

log = logging.getLogger("elborl.export")


def run_export(cfg: RunConfig, run: Path, out: Path, round_: int | None, merged: bool) -> int:
    from learner.engine import read_trained_weights
    from policy.io import model_from_config
    from policy.lora import add_lora, trainable_keys
    from policy.models import model_kind

    kind = model_kind(cfg.model.kind)
    if kind.export is None:
        raise ConfigError(f"model kind {cfg.model.kind!r} cannot be exported")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new directory")
    ckpt = _checkpoint(run, round_)
    verify_checkpoint(ckpt)
    try:
        policy = model_from_config(cfg.model, cfg.world.image_size)
        if cfg.model.lora.rank > 0:
            add_lora(policy, cfg.model.lora)
        weights = read_trained_weights(ckpt / "learner")
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    missing = sorted(set(trainable_keys(policy)) - set(weights))
    if missing:
        raise ConfigError(
            f"checkpoint {ckpt} does not hold this model's trained weights (e.g. {missing[0]}); "
            "was the run made with other model settings than its config.yaml says?"
        )
    policy.load_state_dict(weights, strict=False)
    provenance = _provenance(cfg, run, ckpt)
    out.mkdir(parents=True, exist_ok=True)
    files = kind.export(policy.eval(), out, merged, provenance)
    (out / "elborl_config.yaml").write_text(config_to_yaml(cfg))
    (out / "README.md").write_text(model_card(cfg, provenance, files, merged))
    log.info("exported round %d of %s to %s: %s", provenance["round"], run, out, ", ".join(files))
    return 0


def _checkpoint(run: Path, round_: int | None) -> Path:
    root = run / "checkpoints"
    if round_ is not None:
        ckpt = root / f"round_{round_:05d}"
        if not (ckpt / COMPLETE).exists():
            raise ConfigError(f"--round {round_}: {ckpt} is not a complete checkpoint")
        return ckpt
    latest = latest_complete(root)
    if latest is None:
        raise ConfigError(
            f"{run} has no complete checkpoint to export (train.checkpoint_every > 0 writes them)"
        )
    return latest


def _provenance(cfg: RunConfig, run: Path, ckpt: Path) -> dict[str, Any]:
    round_ = int(json.loads((ckpt / COMPLETE).read_text())["round"])
    return {
        "run": str(run.resolve()),
        "round": round_,
        "base": cfg.model.path or cfg.model.checkpoint,
        "kind": cfg.model.kind,
        "metrics": _final_metrics(run, round_),
    }


def _final_metrics(run: Path, round_: int) -> dict[str, float]:
    """The checkpointed round's training reward and the latest held-out results up to it."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    out: dict[str, float] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line) if line.strip() else {}
        if rec.get("round", -1) > round_:
            break
        for key, value in rec.items():
            wanted = key.startswith("eval/") or key in ("reward/mean", "round")
            if wanted and isinstance(value, int | float):
                out[key] = value
    return out


def model_card(cfg: RunConfig, prov: dict[str, Any], files: list[str], merged: bool) -> str:
    """A short README for the exported directory: what it is, how to load it, what it did."""
    lora = cfg.model.lora
    what = (
        f"LoRA r={lora.rank}, alpha={lora.alpha or 2 * lora.rank}"
        + (" (merged into the weights)" if merged else "")
        if lora.rank > 0
        else "fully fine-tuned weights"
    )
    if cfg.model.kind == "sd3" and lora.rank > 0 and not merged:
        load = (
            "```python\nfrom diffusers import StableDiffusion3Pipeline\n"
            f'pipe = StableDiffusion3Pipeline.from_pretrained("{prov["base"]}")\n'
            'pipe.load_lora_weights("<this directory>")\n```'
        )
    elif cfg.model.kind == "sd3":
        load = (
            "Replace the base pipeline's transformer with `transformer/` "
            '(`SD3Transformer2DModel.from_pretrained(dir, subfolder="transformer")`).'
        )
    else:
        load = "Use this directory as `model.checkpoint` (e.g. `elborl eval --checkpoint DIR`)."
    metrics = "\n".join(f"| {k} | {v:.4g} |" for k, v in prov["metrics"].items())
    return (
        f"# elborl export: {cfg.name}, round {prov['round']}\n\n"
        f"- base model: `{prov['base']}` (kind `{prov['kind']}`)\n"
        f"- what is here: {what}; files: {', '.join(files)}\n"
        f"- trained by elborl (ELBO likelihood, loss `{cfg.learner.loss}`, rewards "
        f"{', '.join(f.name for f in cfg.rewards.functions)}); full config: "
        f"`elborl_config.yaml`; run: `{prov['run']}`\n\n"
        f"## Loading\n\n{load}\n\n"
        f"## Metrics up to the exported round\n\n| metric | value |\n|---|---|\n{metrics}\n"
    )
