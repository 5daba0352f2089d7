"""GRPO: online RL of a causal LM from a reward, with group-relative advantages (no value model).

Each micro-batch takes ``data.batch_size`` prompts and samples ``task.group_size`` responses to
each from the policy (KV-cache generation, ``temperature``/``top_k``; a response ends at the
tokenizer's EOS or the chat template's end of turn, which it keeps as its last token). A reward
function or a reward model scores every response; a response's advantage is its reward minus
its group's mean, divided by the group's standard deviation (plus 1e-4: a group of equal
rewards gives advantages 0, nothing to learn from). The loss of a response token t is

    -[min(ratio_t * A, clip(ratio_t, 1 - clip_eps, 1 + clip_eps) * A) - beta * KL_t]

with ratio_t = pi(t) / pi_rollout(t) (1 on the first of the ``iterations`` steps a rollout
batch is optimised) and KL_t = exp(d) - d - 1, d = log ref(t) - log pi(t) (the "k3" estimator,
unbiased and positive), normalised by the response tokens of the whole optimizer step
(``LMTask``/``StepTokens``: a long response weighs by its tokens, as in DAPO). The reference is
a frozen copy of ``init_from``, or the policy itself with its LoRA adapters switched off.

Rollouts are drawn from a generator seeded by (seed, rank, rollout, micro-batch), and the
prompts of a step are a function of the step (``data/prompts.py``): a resumed run draws what
the uninterrupted one drew. A rollout optimised for several steps travels in the checkpoint.

Logged per logging step: train/reward_mean, reward_std, kl, entropy, clip_fraction,
response_length (tokens); a W&B table of sampled responses with their rewards. Validation
decodes the held-out prompts greedily: ``val/reward`` is their mean reward (step 0 is the start).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.aggregation import MeanMetric

from lmforge.data.datamodule import PromptDataModule
from lmforge.errors import LMForgeError
from lmforge.models.lora import adapters_off
from lmforge.rewards import call_reward, reward_function
from lmforge.run import pretrained_model
from lmforge.tasks.base import LMTask, Recipe
from lmforge.tasks.config import GRPOConfig

ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(reward - group mean) / (group std + 1e-4) for rewards (N,) in groups of ``group_size``
    consecutive responses (the standard deviation with Bessel's correction, as DeepSeekMath)."""
    r = rewards.view(-1, group_size)  # (prompts, group_size)
    std = r.std(dim=1, keepdim=True)
    return ((r - r.mean(dim=1, keepdim=True)) / (std + ADVANTAGE_EPS)).view(-1)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The summed GRPO loss over response tokens, all arguments (M,) per response token, and
    the sums of the token KL and of the tokens whose clipping is active (no gradient)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    d = ref_logp - logp
    kl = torch.exp(d) - d - 1
    loss_sum = -(torch.minimum(unclipped, clipped) - beta * kl).sum()
    active = ((ratio > 1 + clip_eps) & (advantages > 0)) | (
        (ratio < 1 - clip_eps) & (advantages < 0)
    )
    return loss_sum, {"kl": kl.detach().sum(), "clipped": active.sum().float()}


def token_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability and entropy (M,) of the model at the M positions where ``mask``
    (B, T - 1) is set, each position predicting the next token of ``input_ids`` (B, T)."""
    hidden = model.hidden(input_ids[:, :-1])
    logits = model.lm_logits(hidden, positions=mask).float()  # (M, vocab)
    logp_all = logits.log_softmax(dim=-1)
    logp = logp_all.gather(1, input_ids[:, 1:][mask][:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    return logp, entropy.detach()


@dataclass
class Rollout:
    """A micro-batch's sampled responses, scored, with what the loss compares against."""

    index: int  # the rollout it belongs to (a step // iterations)
    input_ids: torch.Tensor  # (N, T) prompt + response, right-padded; N = prompts x group
    mask: torch.Tensor  # (N, T - 1) position predicts a response token
    rewards: torch.Tensor  # (N,)
    advantages: torch.Tensor  # (M,) per response token
    old_logp: torch.Tensor  # (M,) the policy that sampled
    ref_logp: torch.Tensor  # (M,) the reference
    rows: list  # (prompt, response, reward) of the first responses, for the W&B table

    def state(self) -> dict:
        return asdict(self)


class GRPOTask(LMTask):
    config_class = GRPOConfig

    def __init__(
        self,
        model,
        task: GRPOConfig | dict | None = None,
        seed: int = 0,
        family: str = "gpt",
        positions: int = 4096,
    ) -> None:
        super().__init__(task or GRPOConfig(reward="lmforge.rewards.exact_match"), seed)
        self.positions = positions  # prompts x group x max_new_tokens: the loss scale of a step
        self.model = self.make_model(model, family, positions=positions)
        self.task.lora.apply(self.model)
        self.tokenizer = None
        self.prompts: dict[str, list] = {}  # set by the recipe: train and val prompts
        self.stop_ids: list[int] = []
        self.val_reward = MeanMetric()
        self.val_length = MeanMetric()
        # Neither the reference nor the reward model is trained or saved with the policy: kept
        # out of the module tree (object.__setattr__), placed on the device when first used.
        object.__setattr__(self, "_reference", None)
        object.__setattr__(self, "_reward_model", None)
        self._reward_fn = reward_function(self.task.reward) if self.task.reward else None
        self._rollouts: dict[int, Rollout] = {}
        self._stats: dict[str, float] = {}
        self._val_rows: list = []
        self.table: list[list] = []

    @classmethod
    def recipe(cls, run, ckpt_path: str | None) -> Recipe:
        """The policy of ``init_from`` (a causal LM with its tokenizer), the prompt records
        tokenized with it, the reference and the reward; validates before training (step 0)."""
        task = run.task
        loaded, config = pretrained_model(run, 1, causal=True)
        dm = PromptDataModule(
            run.data,
            loaded.tokenizer,
            config.block_size,
            run.cfg.seed,
            task.iterations,
            loaded.tokenizer_settings,
        )
        dm.setup("fit")
        positions = run.data.batch_size * task.group_size * task.max_new_tokens
        module = cls(config, task, run.cfg.seed, loaded.family.name, positions)
        missing, _ = module.model.load_state_dict(loaded.model.state_dict(), strict=False)
        if any("lora_" not in k for k in missing):
            raise LMForgeError(f"the pretrained weights lack {', '.join(missing[:3])}")
        module.tokenizer, module.prompts = loaded.tokenizer, dm.prompts
        module.stop_ids = dm.framing.stop_ids
        if task.reference == "copy":
            object.__setattr__(module, "_reference", loaded.model.eval().requires_grad_(False))
        if task.reward_model is not None:
            from lmforge.checkpoint import load_reward_model
            from lmforge.data.tokenizer import check_same_tokenizer

            where = f"task.reward_model={task.reward_model}"
            rm = load_reward_model(task.reward_model, "cpu")
            if rm.tokenizer is None:
                raise LMForgeError(f"{where} carries no tokenizer: use a checkpoint of task=reward")
            check_same_tokenizer(loaded.tokenizer, rm.tokenizer, where)
            if rm.backbone.config.block_size < config.block_size:
                raise LMForgeError(
                    f"{where} reads {rm.backbone.config.block_size} tokens, fewer than the"
                    f" policy's context of {config.block_size}: use a reward model of the"
                    " policy's context (trained from init_from's model)"
                )
            object.__setattr__(module, "_reward_model", rm)
        rank_zero_info(
            f"GRPO: {module.trained_share()}; {task.group_size} responses per prompt, reward"
            f" {task.reward or task.reward_model}, reference: {task.reference}"
        )
        return Recipe(
            module,
            dm,
            config,
            batch_size=run.data.batch_size * task.group_size,
            seq_len=config.block_size,
            validate_first=ckpt_path is None,
            trainer_args={"inference_mode": False},
        )

    # ----- rollouts -----

    @torch.no_grad()
    def sample(self, prompts: list, n: int, generator: torch.Generator | None) -> list[list[int]]:
        """``n`` responses to each prompt, prompt i's at i*n ... i*n + n - 1, each up to and with
        its first stop token; greedy when ``generator`` is None. Prompts of one length are
        generated as one batch, and a batch stops once every response has stopped."""
        stops = torch.tensor(self.stop_ids, device=self.device)
        out: list[list[int]] = [[] for _ in range(len(prompts) * n)]
        by_length: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            by_length.setdefault(len(p.ids), []).append(i)
        was = self.model.training
        self.model.eval()
        try:
            for length, which in sorted(by_length.items()):
                idx = torch.tensor(
                    [prompts[i].ids for i in which for _ in range(n)], device=self.device
                )
                room = min(self.task.max_new_tokens, self.model.config.block_size - length)
                new, done = [], torch.zeros(idx.size(0), dtype=torch.bool, device=self.device)
                for nxt in self.model.generate_stream(
                    idx,
                    room,
                    temperature=self.task.temperature if generator is not None else 0,
                    top_k=self.task.top_k,
                    generator=generator,
                ):
                    new.append(nxt)
                    done |= torch.isin(nxt[:, 0], stops)
                    if bool(done.all()):
                        break
                tokens = torch.cat(new, dim=1).tolist()
                for row, (i, j) in enumerate((i, j) for i in which for j in range(n)):
                    seq = tokens[row]
                    end = next((k + 1 for k, t in enumerate(seq) if t in self.stop_ids), len(seq))
                    out[i * n + j] = seq[:end]
        finally:
            self.model.train(was)
        return out

    def score(self, prompts: list, responses: list[list[int]], n: int) -> torch.Tensor:
        """The reward of each response (prompt i's n responses at i*n ...), on the CPU."""
        expanded = [p for p in prompts for _ in range(n)]
        if self._reward_model is not None:  # the response with its EOS, as it was trained on
            self._place()
            return self._reward_model.score([p.ids for p in expanded], responses).float().cpu()
        bodies = [r[:-1] if r and r[-1] in self.stop_ids else r for r in responses]
        texts = [self.tokenizer.decode(b) for b in bodies]
        return call_reward(
            self._reward_fn,
            self.task.reward,
            [p.text for p in expanded],
            texts,
            [p.record for p in expanded],
        )

    def _place(self) -> None:
        for m in (self._reference, self._reward_model):
            if isinstance(m, torch.nn.Module) and next(m.parameters()).device != self.device:
                m.to(self.device)

    def rollout_generator(self, rollout: int, micro: int) -> torch.Generator:
        key = (self.seed, self.global_rank, rollout, micro)
        seed = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)
        return torch.Generator(device=self.device).manual_seed(seed)

    @torch.no_grad()
    def rollout(self, indices: list[int], rollout: int, micro: int) -> Rollout:
        """Sample, score and take the log-probabilities the loss compares against."""
        G = self.task.group_size
        prompts = [self.prompts["train"][i] for i in indices]
        responses = self.sample(prompts, G, self.rollout_generator(rollout, micro))
        rewards = self.score(prompts, responses, G)
        seqs = [prompts[k // G].ids + r for k, r in enumerate(responses)]
        longest = max(len(s) for s in seqs)
        pad = self.stop_ids[0]
        input_ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
        mask = torch.zeros(len(seqs), longest - 1, dtype=torch.bool)
        for k, s in enumerate(seqs):
            input_ids[k, : len(s)] = torch.tensor(s)
            start = len(prompts[k // G].ids)
            mask[k, start - 1 : len(s) - 1] = True  # positions predicting the response
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        advantages = group_advantages(rewards, G).to(self.device)
        per_token = advantages[:, None].expand_as(mask)[mask]
        was = self.model.training
        self.model.eval()
        try:
            old_logp, _ = token_logprobs(self.model, input_ids, mask)
            self._place()
            if self._reference is not None:
                ref_logp, _ = token_logprobs(self._reference, input_ids, mask)
            else:
                with adapters_off(self.model):
                    ref_logp, _ = token_logprobs(self.model, input_ids, mask)
        finally:
            self.model.train(was)
        rows = [
            [prompts[k // G].text, self.tokenizer.decode(responses[k]), float(rewards[k])]
            for k in range(min(self.task.table_rows, len(responses)))
        ]
        return Rollout(rollout, input_ids, mask, rewards, per_token, old_logp, ref_logp, rows)

    # ----- training -----

    def training_step(self, batch, batch_idx):
        r, m = int(batch["rollout"]), int(batch["micro"])
        ro = self._rollouts.get(m)
        if ro is None or ro.index != r:
            ro = self._rollouts[m] = self.rollout(list(batch["indices"]), r, m)
        elif ro.input_ids.device != self.device:  # restored from a checkpoint
            ro = self._rollouts[m] = Rollout(
                **{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in ro.state().items()}
            )
        logp, entropy = token_logprobs(self.model, ro.input_ids, ro.mask)
        loss_sum, sums = grpo_loss(
            logp, ro.old_logp, ro.ref_logp, ro.advantages, self.task.clip_eps, self.task.beta
        )
        n = ro.mask.sum()
        self.count_tokens(ro.input_ids.size(0) * (ro.input_ids.size(1) - 1))
        lengths = ro.mask.sum(dim=1).float()
        for key, value in (
            ("tokens", float(n)),
            ("responses", float(ro.rewards.numel())),
            ("reward", float(ro.rewards.sum())),
            ("reward_sq", float((ro.rewards**2).sum())),
            ("length", float(lengths.sum())),
            ("kl", float(sums["kl"])),
            ("clipped", float(sums["clipped"])),
            ("entropy", float(entropy.sum())),
        ):
            self._stats[key] = self._stats.get(key, 0.0) + value
        if m == 0 and self.logging_step():
            self.table += [[self.trainer.global_step, *row] for row in ro.rows]
        return self.step_loss(loss_sum, n, scale=self.positions)

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        stats, self._stats = self._stats, {}
        if not stats or not self.logging_step():
            return
        keys = sorted(stats)
        totals = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        s = dict(zip(keys, totals.tolist(), strict=True))
        tokens, responses = max(s["tokens"], 1.0), max(s["responses"], 1.0)
        mean = s["reward"] / responses
        row = {
            "train/reward_mean": mean,
            "train/reward_std": max(s["reward_sq"] / responses - mean**2, 0.0) ** 0.5,
            "train/kl": s["kl"] / tokens,
            "train/entropy": s["entropy"] / tokens,
            "train/clip_fraction": s["clipped"] / tokens,
            "train/response_length": s["length"] / responses,
        }
        for logger in self.trainer.loggers:
            logger.log_metrics(row, step=self.trainer.global_step)
        self.log("train/reward", mean, prog_bar=True, logger=False)

    # ----- validation -----

    def validation_step(self, batch, batch_idx):
        indices = batch["index"][batch["labels"] != -100].tolist()  # -100: a rank's blank
        if not indices:
            return
        prompts = [self.prompts["val"][i] for i in indices]
        responses = self.sample(prompts, 1, None)
        rewards = self.score(prompts, responses, 1)
        self.val_reward.update(rewards.mean(), weight=len(rewards))
        lengths = torch.tensor([float(len(r)) for r in responses])
        self.val_length.update(lengths.mean(), weight=len(lengths))
        if batch_idx == 0:
            self._val_rows = [
                [prompts[0].text, self.tokenizer.decode(responses[0]), float(rewards[0])]
            ]

    def on_validation_epoch_end(self) -> None:
        if self.val_reward.update_count == 0:
            return
        reward, length = self.val_reward.compute(), self.val_length.compute()
        self.val_reward.reset()
        self.val_length.reset()
        self.log("val/reward", reward, prog_bar=True, sync_dist=True)
        self.log("val/response_length", length, sync_dist=True)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            step = self.trainer.global_step
            if self._val_rows:
                prompt, response, r = self._val_rows[0]
                print(
                    f"\n----- greedy response at step {step} (reward {r:.3g}) -----\n"
                    f"{prompt}{response}\n-----"
                )
            self.log_table()

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            self.log_table()

    def log_table(self) -> None:
        """The sampled responses so far, with their rewards, as a W&B table (when W&B logs)."""
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and self.table:
                logger.log_text(
                    key="samples",
                    columns=["step", "prompt", "response", "reward"],
                    data=self.table,
                )

    # ----- checkpoints -----

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.task.iterations > 1:  # the rollout the next steps go on optimising
            checkpoint["grpo_rollouts"] = {m: ro.state() for m, ro in self._rollouts.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._rollouts = {
            int(m): Rollout(**state) for m, state in checkpoint.get("grpo_rollouts", {}).items()
        }
