"""The resolved configuration of one training run, validated by pydantic; nothing here knows YAML or Slurm.

A `RunConfig` is what `train(config, run_dir)` needs, complete. Its `run_id` is a hash of its content, so
the same config always maps to the same run dir and the same W&B run.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from asbatch.names import DATASETS, MAX_SEED, MODELS, OOD_DATASETS, check_name


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # numbers are finite

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads `lr: true` as 1.0 and `epochs: true` as 1; a bool in a number field is a mistake
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and {int, float} & {annotation, *get_args(annotation)}:
            raise ValueError("expected a number, not true / false")
        return value


class DataConfig(Section):
    name: Literal[DATASETS] = "digits"
    root: str | None = Field(None, min_length=1, max_length=4096,
                             description="data root; default $ASBATCH_DATA or ./data")
    batch_size: int = Field(128, gt=0, le=1_000_000, description="global batch size (split across processes)")
    test_batch_size: int = Field(1000, gt=0, le=1_000_000)
    augment: bool | None = Field(
        None, description="random crop (padding H/8) + horizontal flip; default: on for CIFAR only (flips and "
                          "shifts hurt digit data)")
    train_subset: int | None = Field(None, gt=0, description="use only the first N training examples")
    test_subset: int | None = Field(None, gt=0, description="use only the first N test examples")
    normalize: Literal["dataset", "imagenet"] = Field(
        "dataset", description="input mean/std: the train split's own, or ImageNet's (as the reference code "
                               "uses on CIFAR; 3-channel data only)")


class ModelConfig(Section):
    name: Literal[MODELS] = "resnet20"
    bayesian: bool = True
    width: int | None = Field(None, gt=0, le=4096,
                              description="channel width of the first stage (smaller = faster)")
    init_sigma: float = Field(0.15, gt=0, le=10)
    init_log_sigma: float | None = Field(
        None, ge=-20, le=5, allow_inf_nan=False,
        description="initial log sigma, written as is (the reference code writes 0.15: sigma = exp(0.15) ~ 1.16); "
                    "replaces init_sigma")
    prior_sigma: float = Field(0.15, gt=0, le=10)
    mu_init: Literal["model", "uniform_fan_in"] = Field(
        "model", description="mu of conv / linear layers: the architecture's init, or U(+-1/sqrt(fan_in)) (reference)")
    bn_weight_init: Literal["ones", "uniform"] = Field(
        "ones", description="BatchNorm weight: 1, or U(0, 1) as the reference code")
    init_from: str | None = Field(
        None, min_length=1, max_length=4096,
        description="Bayesian fine-tune: a deterministic run dir or checkpoint file to initialise mu from")

    @model_validator(mode="after")
    def _one_sigma_init(self) -> ModelConfig:
        if self.init_log_sigma is not None and "init_sigma" in self.model_fields_set:
            raise ValueError("give init_sigma or init_log_sigma, not both")
        return self


class OptimConfig(Section):
    name: Literal["adam", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, le=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(None, gt=0, le=1e6, description="clip the global grad norm to this value")
    reset_each_epoch: bool = Field(
        False, description="clear the optimizer's state (Adam moments) at every epoch start, as the reference "
                           "code re-creates its Adam every epoch")


class ScheduleConfig(Section):
    name: Literal["multistep", "cosine", "constant"] = "multistep"
    epochs: int = Field(200, gt=0, le=100_000)
    milestones: tuple[Annotated[int, Field(ge=1, le=100_000)], ...] = Field(
        (80, 140, 180), description="multistep: epochs where lr *= gamma")
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0, le=100_000, description="linear warmup from 0, in (fractional) epochs")


class AdversarialConfig(Section):
    lam: float = Field(0.8, ge=0, le=1, description="weight of L_adv; 0 = plain Bayes-by-backprop")
    steps: int = Field(5, ge=0, le=1000, description="N, sign-ascent steps on eps")
    alpha: float = Field(0.02, ge=0, le=10, description="step size on eps")
    kl_weight: float | None = Field(None, ge=0, le=1, description="beta; default 1 / (100 * N_train) as the paper")
    variant: Literal["paper", "reference"] = Field(
        "paper", description="paper: the paper's equations; reference: the reference code's step (run-long "
                             "accumulated eps gradients, KL weighted by 1 - lambda, ...; see asbatch.adversarial)")
    inner_precision: Literal["autocast", "fp32"] = Field(
        "autocast", description="precision of the inner ascent passes under bf16/fp16: the run's autocast (bf16 "
                                "ascents reach 99.6-99.9 % of the fp32 ascent's loss increase at 0.55x the step cost, "
                                "benchmarks row 9), or fp32")


class EvalConfig(Section):
    num_samples: int = Field(10, gt=0, le=10_000, description="S weight samples in the final evaluation")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    score: Literal["entropy", "mutual_information", "max_prob"] = "entropy"
    ood: Literal[OOD_DATASETS] | None = None


class TrackingConfig(Section):
    wandb: Literal["auto", "online", "offline", "disabled"] = "disabled"
    project: str = Field("asbatch", min_length=1, max_length=128)
    entity: str | None = Field(None, min_length=1, max_length=128)
    tags: tuple[Annotated[str, Field(min_length=1, max_length=64)], ...] = ()


class SpeedConfig(Section):
    """Settings that change how fast a run trains: not part of the run id. `compile` and `channels_last` change
    numbers (their kernels round differently), so analysis keeps them apart; `poll_every` changes none."""

    poll_every: int = Field(
        50, gt=0, le=100_000,
        description="read the device every K steps (loss finiteness; with several ranks the stop agreement): a "
                    "step itself reads nothing, so a GPU never waits for the host; a signal stops the run "
                    "within K steps with several ranks, at once with one")
    compile: bool = Field(
        False, description="torch.compile the training step's model (each kind of pass one graph, compiled in the "
                           "first steps); compiled kernels round differently from eager ones, so runs with it are a "
                           "separate experiment in tables (a run's results record it)")
    channels_last: bool = Field(
        False, description="conv weights and activations in channels_last (NHWC) memory order, the order a GPU's "
                           "tensor cores read under bf16 / fp16 (no transposes around each conv); other kernels "
                           "round differently and eps elements land on other weights, so runs with it are a "
                           "separate experiment in tables (a run's results record it)")


# sections that do not change a run's results, so not part of its id
NOT_IN_RUN_ID = ("tracking", "speed")


class RunConfig(Section):
    sweep: str = "default"
    stage: str = "train"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = Field(False, description="force CPU even where a GPU exists")
    deterministic: bool = Field(
        False, description="deterministic GPU kernels (cuDNN / cuBLAS settings, torch.use_deterministic_algorithms): "
                           "exact resume on GPUs too, at some speed; off: cudnn.benchmark picks the fastest kernels")
    checkpoint_every: int = Field(200, gt=0, le=10**9, description="also checkpoint every K optimizer steps")
    keep_checkpoints: int = Field(2, gt=0, le=1000)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    adversarial: AdversarialConfig = AdversarialConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    speed: SpeedConfig = SpeedConfig()

    @field_validator("sweep", "stage")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_name(v)  # names become directory names, Slurm job names and W&B groups

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if not self.model.bayesian and self.adversarial.lam > 0:
            raise ValueError("adversarial.lam > 0 needs model.bayesian: true (AS perturbs the weight noise)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @property
    def run_id(self) -> str:
        """Stable id: a hash of everything except the sections that do not change results (tracking, speed)."""
        content = self.to_dict()
        for section in NOT_IN_RUN_ID:
            content.pop(section)
        blob = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return f"{self.stage}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"
