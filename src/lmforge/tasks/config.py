"""The typed config of every task: one dataclass per task, reached by ``task._target_``.

Every ``task.*`` key reaches the code through these classes (merged like the model and data
configs, so a typo or a wrong type fails before any work) and nowhere else. Each config names
its LightningModule, whose ``recipe`` classmethod builds the run's module and data module, and
declares what the runner needs to know: the data it trains on and whether it starts from
pretrained weights. No Lightning import here: configs are validated before it is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from lmforge.data.classification import ClassificationDataConfig
from lmforge.data.config import DataConfig
from lmforge.data.instructions import InstructionDataConfig
from lmforge.data.masking import MaskingConfig
from lmforge.data.preferences import PreferenceDataConfig
from lmforge.data.prompts import PromptDataConfig
from lmforge.errors import LMForgeError
from lmforge.models.lora import LoRAConfig
from lmforge.tasks.optim import OptimConfig

DATA_KINDS = {  # what each data config holds, for messages
    DataConfig: "a prepared token set (data=shakespeare_char, gutenberg_bpe, corpus, ...)",
    ClassificationDataConfig: "labelled texts (data=sms_spam)",
    InstructionDataConfig: "instruction records (data=instructions)",
    PreferenceDataConfig: "preference pairs (data=preferences)",
    PromptDataConfig: "prompt records (data=prompts)",
}


@dataclass
class TaskConfig:
    """What every task shares: the optimizer and how a step runs."""

    name: str = "task"  # names the run directory: logs/<name>/<run_name>
    compile: str = "auto"  # torch.compile the model: auto (on CUDA) | true | false
    activation_checkpointing: bool = False  # recompute each block in the backward
    on_nonfinite: str = "stop"  # a NaN/inf loss or gradient norm: stop | skip the step
    max_skipped_steps: int = 10  # on_nonfinite=skip: stop after this many skips in a row
    optim: OptimConfig = field(default_factory=OptimConfig)

    module: ClassVar[str]  # the LightningModule whose ``recipe`` builds the run
    data: ClassVar[type]  # the data config it trains on
    pretrained: ClassVar[bool] = False  # starts from init_from; its architecture comes from there

    def __post_init__(self) -> None:
        if str(self.compile).lower() not in ("auto", "true", "false"):
            raise LMForgeError(f"task.compile={self.compile!r}: use auto (on CUDA), true or false")
        self.compile = str(self.compile).lower()
        if self.on_nonfinite not in ("stop", "skip"):
            raise LMForgeError(f"task.on_nonfinite={self.on_nonfinite!r}: use stop or skip")
        if self.max_skipped_steps < 1:
            raise LMForgeError(f"task.max_skipped_steps must be >= 1, got {self.max_skipped_steps}")

    def check_data(self, data: Any) -> None:
        """Refuse data this task cannot train on, naming both and the fix."""
        if isinstance(data, self.data):
            return
        takes = [
            name
            for c in _task_configs()
            if isinstance(data, getattr(c, "data", ()))
            and (name := c.__dataclass_fields__["name"].default) != TaskConfig.name
        ]
        fix = f"use task={' or task='.join(takes)}" if takes else "choose another data config"
        raise LMForgeError(
            f"task={self.name} trains on {DATA_KINDS[self.data]}, but data= holds"
            f" {DATA_KINDS.get(type(data), type(data).__name__)}: {fix} for this data, or a"
            f" data config of the task's kind"
        )

    def check_model(self, model: Any) -> None:
        """Refuse a model config that does not fit the task: a fine-tune takes its architecture
        from init_from (``model=pretrained``), a pretraining task a model of its own."""
        from lmforge.models.registry import FromPretrained

        if self.pretrained and not isinstance(model, FromPretrained):
            raise LMForgeError(
                f"task={self.name} takes its architecture from init_from: use model=pretrained"
                " (model.dropout may be set)"
            )
        if not self.pretrained and isinstance(model, FromPretrained):
            raise LMForgeError(
                f"task={self.name} trains a model of its own: choose one (model=gpt-mini, ...),"
                " not model=pretrained"
            )


def _task_configs() -> list[type[TaskConfig]]:
    """Every task config class (not instances: a task's defaults may not validate alone, e.g.
    GRPO's reward must be named)."""
    found, todo = [], list(TaskConfig.__subclasses__())
    while todo:
        c = todo.pop()
        found.append(c)
        todo += c.__subclasses__()
    return found


@dataclass
class CausalLMConfig(TaskConfig):
    """Next-token prediction (GPT pretraining)."""

    name: str = "causal_lm"
    module: ClassVar[str] = "lmforge.tasks.causal_lm.CausalLMTask"
    data: ClassVar[type] = DataConfig


@dataclass
class MaskedLMConfig(TaskConfig):
    """Masked-token prediction (BERT pretraining) with dynamic 80/10/10 masking."""

    name: str = "masked_lm"
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    module: ClassVar[str] = "lmforge.tasks.masked_lm.MaskedLMTask"
    data: ClassVar[type] = DataConfig


@dataclass
class HeadConfig(TaskConfig):
    """What the tasks that put a head on a pretrained GPT (last token) or BERT (pooled [CLS])
    share: LoRA, or training only the last blocks."""

    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train_last_blocks: int | None = None  # train only the last k blocks (and the head); null: all
    pretrained: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train_last_blocks is not None and self.train_last_blocks < 0:
            raise LMForgeError(
                f"task.train_last_blocks must be >= 0 or null, got {self.train_last_blocks}"
            )


@dataclass
class ClassificationConfig(HeadConfig):
    """A linear head on a pretrained GPT (last token) or BERT (pooled [CLS])."""

    name: str = "classification"
    module: ClassVar[str] = "lmforge.tasks.classification.ClassificationTask"
    data: ClassVar[type] = ClassificationDataConfig


@dataclass
class InstructionConfig(TaskConfig):
    """Instruction tuning of a pretrained GPT: loss on the response tokens only."""

    name: str = "instruction"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    max_new_tokens: int = 64  # length of the responses generated at each validation
    module: ClassVar[str] = "lmforge.tasks.instruction.InstructionTask"
    data: ClassVar[type] = InstructionDataConfig
    pretrained: ClassVar[bool] = True


@dataclass
class RewardConfig(HeadConfig):
    """A reward model: a scalar head on a pretrained GPT (last token) or BERT (pooled [CLS]),
    trained on preference pairs with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected
    - margin)."""

    name: str = "reward"
    margin: float = 0.0  # added to each pair's own (a record's `margin`): r_c must beat r_r by it
    module: ClassVar[str] = "lmforge.tasks.reward.RewardTask"
    data: ClassVar[type] = PreferenceDataConfig


@dataclass
class DPOConfig(TaskConfig):
    """Direct preference optimisation of an instruction-tuned GPT (init_from) against a frozen
    reference of it."""

    name: str = "dpo"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge
    beta: float = 0.1  # how far the policy may move from the reference (> 0)
    label_smoothing: float = 0.0  # sigmoid only: the share of pairs taken as mislabelled (cDPO)
    # copy: a frozen copy of init_from | adapters_off: the policy with its LoRA adapters off (no
    # second model in memory; needs task.lora.rank > 0) | auto: adapters_off with LoRA, else copy
    reference: str = "auto"
    reference_from: str | None = None  # reference=copy: another checkpoint of the same model
    precompute_reference: bool = False  # reference log-probs computed once, kept beside the run
    module: ClassVar[str] = "lmforge.tasks.dpo.DPOTask"
    data: ClassVar[type] = PreferenceDataConfig
    pretrained: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in ("sigmoid", "ipo", "hinge"):
            raise LMForgeError(f"task.loss={self.loss!r}: use sigmoid (DPO), ipo or hinge")
        if not self.beta > 0:
            raise LMForgeError(f"task.beta={self.beta}: use a positive number (0.1 is usual)")
        if not 0 <= self.label_smoothing < 0.5:
            raise LMForgeError(
                f"task.label_smoothing={self.label_smoothing}: use a value in [0, 0.5)"
            )
        if self.label_smoothing and self.loss != "sigmoid":
            raise LMForgeError(
                f"task.label_smoothing={self.label_smoothing} applies to task.loss=sigmoid only:"
                f" set task.label_smoothing=0 for task.loss={self.loss}"
            )
        if self.reference == "auto":
            self.reference = "adapters_off" if self.lora.rank > 0 else "copy"
        if self.reference not in ("copy", "adapters_off"):
            raise LMForgeError(
                f"task.reference={self.reference!r}: use copy, adapters_off (with task.lora.rank"
                " > 0) or auto"
            )
        if self.reference == "adapters_off" and self.lora.rank == 0:
            raise LMForgeError(
                "task.reference=adapters_off needs LoRA adapters: set task.lora.rank (e.g. 8), or"
                " use task.reference=copy"
            )
        if self.reference_from and self.reference != "copy":
            raise LMForgeError(
                f"task.reference_from={self.reference_from} is a separate model:"
                " set task.reference=copy, or leave task.reference_from unset"
            )


@dataclass
class GRPOConfig(TaskConfig):
    """Online RL of a pretrained causal LM with group-relative advantages (GRPO): each prompt's
    ``group_size`` sampled responses are scored, and each response's advantage is its reward
    standardised within its group; no value model. The policy keeps close to a frozen
    reference through a KL penalty (``beta``)."""

    name: str = "grpo"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    group_size: int = 8  # responses sampled per prompt (advantages are relative to the group)
    max_new_tokens: int = 64  # longest response (sampled, and greedy at validation)
    temperature: float = 1.0  # sampling temperature of the rollouts
    top_k: int | None = None  # sample among the k likeliest tokens; null: all
    beta: float = 0.04  # weight of the KL penalty to the reference (k3 estimator, per token)
    clip_eps: float = 0.2  # the ratio to the rollout policy is clipped to [1 - eps, 1 + eps]
    iterations: int = 1  # optimizer steps on each rollout batch (1: ratio 1, no clipping)
    reward: str | None = None  # a Python function module.fn(prompts, responses, records)
    reward_model: str | None = None  # or a reward model: a checkpoint of task=reward
    reference: str = "copy"  # copy: a frozen copy of init_from | adapters_off: LoRA disabled
    table_rows: int = 4  # sampled responses per logging step kept for the W&B table
    module: ClassVar[str] = "lmforge.tasks.grpo.GRPOTask"
    data: ClassVar[type] = PromptDataConfig
    pretrained: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 2:
            raise LMForgeError(
                f"task.group_size={self.group_size}: GRPO compares each response with the others"
                " sampled for its prompt, so it needs at least 2: set task.group_size>=2"
            )
        for key in ("max_new_tokens", "iterations", "table_rows"):
            if getattr(self, key) < (0 if key == "table_rows" else 1):
                raise LMForgeError(f"task.{key} must be positive, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise LMForgeError(
                f"task.temperature={self.temperature}: rollouts are sampled, use a positive"
                " temperature (validation decodes greedily anyway)"
            )
        if self.top_k is not None and self.top_k < 1:
            raise LMForgeError(f"task.top_k={self.top_k}: use a positive number or null")
        if self.beta < 0 or not 0 < self.clip_eps < 1:
            raise LMForgeError(
                f"task.beta={self.beta}, task.clip_eps={self.clip_eps}: use beta >= 0 and"
                " 0 < clip_eps < 1"
            )
        if self.reference not in ("copy", "adapters_off"):
            raise LMForgeError(f"task.reference={self.reference!r}: use copy | adapters_off")
        if self.reference == "adapters_off" and self.lora.rank == 0:
            raise LMForgeError(
                "task.reference=adapters_off needs LoRA adapters: set task.lora.rank>0, or"
                " task.reference=copy"
            )
        if (self.reward is None) == (self.reward_model is None):
            raise LMForgeError(
                "task=grpo needs exactly one of task.reward (a Python function module.fn, e.g."
                " lmforge.rewards.exact_match) and task.reward_model (a reward model checkpoint)"
            )
        if self.reward is not None:
            from lmforge.rewards import reward_function

            reward_function(self.reward)  # one line now if it does not import
