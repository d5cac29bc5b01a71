"""Settings of the policy model: which kind, where its weights are, LoRA, pretraining."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from common.config import PositiveInt, Section


class LoraConfig(Section):
    """Low-rank adapters on the attention projections (peft); rank 0 trains all weights."""

    rank: int = Field(0, ge=0, description="LoRA rank r; 0 disables LoRA (full fine-tuning).")
    alpha: int = Field(0, ge=0, description="LoRA alpha; scale is alpha / rank. 0 means 2 * rank.")
    target_modules: list[str] | None = Field(
        None,
        description="Module name suffixes of the denoiser that receive adapters; null = the "
        "model kind's default (`tiny`: to_q, to_k, to_v, to_out.0; `sd3`: both streams of the "
        "joint attention, the paper's eight projections; `flux`: those and both streams' "
        "feed-forward layers). The count of adapted modules is "
        "logged when the adapters are added.",
    )


class ModelConfig(Section):
    """Which policy model to load or build."""

    kind: str = Field(
        "tiny",
        description="Model family, a registered kind (`policy/models.py`): `tiny` is the "
        "built-in pixel-space flow model (weights from model.checkpoint); `sd3` (SD3/SD3.5), "
        "`flux` (FLUX.1-dev/schnell) and `sd` (SD1.x/SD2.x or SDXL, in the flow view) load "
        "the local diffusers directory model.path.",
    )
    checkpoint: str | None = Field(
        "checkpoints/shapes-base",
        description="Directory of a saved model (config.json + model.safetensors) for kinds "
        "saved by elborl (`tiny`); null builds a randomly initialised model from `arch` "
        "(pretraining) and is implied for kinds that load model.path.",
    )
    arch: dict[str, Any] = Field(
        default_factory=dict,
        description="Architecture of a model built from scratch, validated by its kind (for "
        "`tiny`: `policy.tiny.TinyArchConfig`: channels, layers_per_block, text_dim, "
        "text_layers, pack). Defaults are filled in.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Adapter settings for RL.")
    path: str | None = Field(
        None,
        description="Local diffusers-format directory of a real model (kinds that load one, "
        "e.g. `sd3`: model_index.json, transformer/, vae/, scheduler/, text encoders and "
        "tokenizers, as `save_pretrained` writes it). Never downloaded from a hub.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Weights and compute dtype of the denoiser and text encoders of a real "
        "model; the VAE stays float32 and LoRA parameters float32. `tiny` is float32 only.",
    )
    max_sequence_length: PositiveInt = Field(
        128,
        description="Tokens of the T5 prompt encoding for kinds that have one (`sd3`); the "
        "paper and flow_grpo use 128.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where each rollout worker and learner rank runs its model: `auto` = the "
        "GPU Ray gave the actor (its `resources.num_gpus` > 0 and CUDA present), else the CPU; "
        "`cuda` fails at start-up where no GPU is visible; `cpu` never uses one.",
    )
    text_encoder_device: Literal["same", "cpu"] = Field(
        "same",
        description="Rollout workers of real models: text encoders on the model's device "
        "(`same`) or kept on the CPU (`cpu`: saves their GPU memory, e.g. ~9.5 GB of T5-XXL; "
        "each prompt is encoded once and cached). Learner ranks load none: the conditionings "
        "come with the samples.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute the denoiser's activations in backward (less memory, ~30 % "
        "more learner time); for real models.",
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        from policy.models import model_kinds

        return model_kinds().check(v)

    @model_validator(mode="after")
    def _weights_of_the_kind(self) -> ModelConfig:
        """A kind that loads from ``path`` needs one (and no ``checkpoint``); others the
        reverse."""
        from policy.models import model_kind

        kind = model_kind(self.kind)
        if kind.from_path is None:
            if self.path is not None:
                raise ValueError(
                    f"model kind {self.kind!r} loads from model.checkpoint, not model.path; "
                    "remove model.path (or pick a kind that loads a diffusers directory: sd3)"
                )
            if self.dtype != "float32":
                raise ValueError(f"model kind {self.kind!r} runs in float32 only (model.dtype)")
            return self
        if self.path is None:
            raise ValueError(
                f"model kind {self.kind!r} needs model.path, the local diffusers directory of "
                "the model (set it with --set model.path=DIR)"
            )
        if self.dtype != "float32" and self.lora.rank == 0:
            raise ValueError(
                f"model.dtype = {self.dtype} needs LoRA (model.lora.rank > 0): fully fine-tuned "
                "weights are published as numpy arrays, which have no bfloat16; LoRA adapters "
                "stay float32 on a lower-precision base"
            )
        if "checkpoint" not in self.model_fields_set:
            object.__setattr__(self, "checkpoint", None)  # the tiny default does not apply
        elif self.checkpoint is not None:
            raise ValueError(
                f"model kind {self.kind!r} loads its weights from model.path; model.checkpoint "
                "must be null (resume a run with --resume instead)"
            )
        return self

    @model_validator(mode="after")
    def _arch_of_the_kind(self) -> ModelConfig:
        """``arch`` holds the kind's own validated settings, defaults filled in."""
        from policy.models import model_kind

        arch_cls = model_kind(self.kind).arch_config
        if arch_cls is None:
            if self.arch:
                raise ValueError(f"model kind {self.kind!r} takes no `arch` settings")
            return self
        try:
            full = arch_cls.model_validate(self.arch).model_dump(mode="json")
        except ValidationError as err:
            problems = "; ".join(
                f"arch.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
            )
            raise ValueError(problems) from None
        object.__setattr__(self, "arch", full)
        return self

    def arch_settings(self) -> Section:
        """The kind's typed architecture settings."""
        from policy.models import model_kind

        arch_cls = model_kind(self.kind).arch_config
        if arch_cls is None:
            raise ValueError(f"model kind {self.kind!r} has no architecture settings")
        return arch_cls.model_validate(self.arch)


class PretrainConfig(Section):
    """Supervised flow-matching pretraining of the base policy on rendered images."""

    steps: PositiveInt = Field(2000, description="Optimizer steps.")
    batch_size: PositiveInt = Field(64, description="Images per optimizer step.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    warmup_steps: int = Field(100, ge=0, description="Linear learning-rate warm-up, in steps.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="After warm-up: keep `lr` (constant) or decay it along a half cosine to "
        "`min_lr_ratio * lr` at the last step (cosine).",
    )
    min_lr_ratio: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Final learning rate of the cosine schedule, as a fraction of `lr`.",
    )
    ema_decay: float = Field(
        0.999, ge=0, lt=1, description="EMA decay of the saved weights per step."
    )
    prompt_dropout: float = Field(
        0.1, ge=0, le=1, description="Fraction of prompts replaced by the empty prompt (for CFG)."
    )
    max_minutes: float | None = Field(
        None, gt=0, description="Stop early after this much wall-clock time (minutes); null = none."
    )
    eval_every: int = Field(500, ge=0, description="Steps between quick held-out evals; 0 = never.")
    output: str = Field("checkpoints/shapes-base", description="Directory the checkpoint goes to.")
    snapshot_every: int = Field(
        300,
        ge=0,
        description="Steps between resume snapshots (model, EMA, optimizer and random states, "
        "written atomically to `<output>.resume/`); a rerun of the same command continues from "
        "the last one. 0 = never.",
    )
