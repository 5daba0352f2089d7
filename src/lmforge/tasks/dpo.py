"""Direct preference optimisation (DPO, Rafailov et al. 2023) of an instruction-tuned causal LM.

The policy starts from ``init_from`` (an SFT checkpoint); the reference is the same model frozen:
a copy of it (``task.reference=copy``, or the model of ``task.reference_from``), or, with LoRA,
the policy itself with its adapters off (``adapters_off``: no second model in memory). The log-
probability of a response is the sum of its tokens' log-probabilities (the labels that are not
-100); chosen and rejected responses of a batch go through the model in one forward, as TRL's
``concatenated_forward``. Losses (``task.loss``), with z = beta * ((pi_c - ref_c) - (pi_r - ref_r)):

    sigmoid  -(1 - eps) log sigma(z) - eps log sigma(-z)   (DPO; eps: label_smoothing, cDPO)
    ipo      (z / beta - 1 / (2 beta))^2                  (IPO, Azar et al. 2023)
    hinge    max(0, 1 - z)                                 (SLiC)

The loss of an optimizer step is the mean over the real pairs of its micro-batches and ranks
(``StepTokens`` counting pairs, not tokens). Metrics are named as TRL names them:
rewards/chosen = beta (pi_c - ref_c), rewards/rejected, rewards/margins (their difference),
rewards/accuracies (the share of pairs whose chosen reward is the higher), logps/chosen,
logps/rejected; logged as train/... every logging step and val/... every validation.

Checkpoints hold the policy only (and its optimizer state): the reference is rebuilt from
``init_from`` (or ``task.reference_from``) when a run resumes, and the sha256 of its weights,
recorded in every checkpoint, must match, so a resumed run trains against the reference it
started with. With ``task.precompute_reference`` the reference log-probs of every pair are
computed once before training, split between the ranks, and kept beside the run
(``<run dir>/reference_logps.pt``, written atomically, read back through its CRC-32s and keyed
by the reference weights, the pairs and the precision); a resumed run reads them back.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics.aggregation import MeanMetric

from lmforge.data.datamodule import PreferenceDataModule
from lmforge.data.preferences import Pair, pad_pairs
from lmforge.errors import LMForgeError
from lmforge.models.lora import adapters_off
from lmforge.tasks.base import LMTask, Recipe
from lmforge.tasks.config import DPOConfig

# TRL's names, and the attribute-safe keys of the validation metrics
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
CACHE_FILE = "reference_logps.pt"


def response_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) sums of the log-probabilities of each row's target tokens (labels != -100)."""
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    )
    return -nll.view(labels.shape).sum(-1)


def pair_logps(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of the chosen and the rejected responses of a batch of pairs
    (each (B,)), in one forward of both."""
    c_ids, r_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
    c_lab, r_lab = batch["chosen_labels"], batch["rejected_labels"]
    T = max(c_ids.size(1), r_ids.size(1))

    def right_pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(x, (0, T - x.size(1)), value=value)

    ids = torch.cat([right_pad(c_ids, 0), right_pad(r_ids, 0)])  # (2B, T)
    labels = torch.cat([right_pad(c_lab, -100), right_pad(r_lab, -100)])
    logps = response_logps(model(ids), labels)
    return logps[: c_ids.size(0)], logps[c_ids.size(0) :]


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    loss: str,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from the summed log-probs of each
    pair's responses under the policy and the reference (each (B,)). Rewards are detached."""
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    logits = chosen - rejected  # the difference of the implicit rewards, over beta
    if loss == "sigmoid":
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    elif loss == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:  # DPOConfig refuses other names
        raise LMForgeError(f"task.loss={loss!r}: use sigmoid, ipo or hinge")
    return losses, beta * chosen.detach(), beta * rejected.detach()


def weights_digest(model: nn.Module) -> str:
    """sha256 of a model's weights (names, dtypes, shapes and bytes): what a reference is."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def pairs_digest(*splits) -> str:
    """sha256 of the token ids of every pair of the splits (what the cached log-probs are of)."""
    h = hashlib.sha256()
    for pairs in splits:
        h.update(f"{len(pairs)}|".encode())
        for p in pairs:
            for ids in (p.prompt, p.chosen, p.rejected):
                h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes() + b"|")
    return h.hexdigest()


@dataclass
class IndexedPair(Pair):
    """A pair and its place in its split (-1: a blank), which finds its cached reference
    log-probs."""

    index: int = -1


def collate(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """``pad_pairs``, and ``index`` (B,): each pair's place in its split (-1: a blank)."""
    batch = pad_pairs(pairs, pad_id)
    batch["index"] = torch.tensor([getattr(p, "index", -1) for p in pairs], dtype=torch.long)
    return batch


class DPODataModule(PreferenceDataModule):
    """Preference pairs whose batches also say where each pair lies in its split."""

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        super().setup(stage)
        for split, pairs in self.sets.items():
            self.sets[split] = [IndexedPair(**asdict(p), index=i) for i, p in enumerate(pairs)]

    def _collate(self):
        return functools.partial(collate, pad_id=self.pad_id)


class DPOTask(LMTask):
    config_class = DPOConfig

    def __init__(
        self,
        model,
        task: DPOConfig | dict | None = None,
        seed: int = 0,
        family: str = "gpt",
        pairs: int = 16,
    ) -> None:
        super().__init__(task or DPOConfig(), seed)
        self.pairs = pairs  # pairs per micro-batch (data.batch_size): the loss scale of a step
        self.model = self.make_model(model, family, pairs=pairs)
        self.task.lora.apply(self.model)
        # The frozen reference of task.reference=copy, kept out of the module's children so that
        # checkpoints, the optimizer and sharding never see it (set_reference).
        self._reference: list[nn.Module] = []
        self.reference_digest: str | None = None
        self.cache_path: Path | None = None  # where precomputed reference log-probs are kept
        self.cache: dict[str, torch.Tensor] = {}  # split -> (N, 2) reference log-probs
        self.val_metrics = nn.ModuleDict(
            {k.replace("/", "_"): MeanMetric() for k in ("loss", *METRICS)}
        )
        self._stats: torch.Tensor | None = None  # the step's sums of METRICS, and its pairs

    # -- the run -----------------------------------------------------------------------------

    @classmethod
    def recipe(cls, run, ckpt_path: str | None) -> Recipe:
        """Preference pairs tokenized with the SFT model's tokenizer, the policy initialised
        from ``init_from`` and its reference; validates before training (step 0)."""
        from lmforge.run import pretrained_model

        task: DPOConfig = run.task
        loaded, config = pretrained_model(run, run.data.max_len, causal=True)
        dm = DPODataModule(
            run.data, loaded.tokenizer, seed=run.cfg.seed, settings=loaded.tokenizer_settings
        )
        dm.setup("fit")
        module = cls(config, task, run.cfg.seed, loaded.family.name, run.data.batch_size)
        missing, _ = module.model.load_state_dict(loaded.model.state_dict(), strict=False)
        if any("lora_" not in k for k in missing):
            raise LMForgeError(f"the pretrained weights lack {', '.join(missing[:3])}")
        reference = loaded.model
        if task.reference_from:
            reference = reference_model(task.reference_from, loaded)
        if task.reference == "copy":
            module.set_reference(reference)
        module.reference_digest = weights_digest(reference)
        refuse_other_reference(ckpt_path, module.reference_digest, task)
        if task.precompute_reference:
            module.cache_path = Path(run.cfg.paths.output_dir) / CACHE_FILE
        rank_zero_info(
            f"DPO ({task.loss}, beta {task.beta}): {module.trained_share()}; reference: "
            + (
                "the policy with its adapters off"
                if task.reference == "adapters_off"
                else "a frozen copy"
            )
            + (", log-probs precomputed" if task.precompute_reference else "")
        )
        return Recipe(
            module,
            dm,
            config,
            batch_size=run.data.batch_size,
            seq_len=2 * run.data.max_len,  # chosen and rejected of each pair
            validate_first=ckpt_path is None,
            trainer_args={"inference_mode": False},
        )

    def set_reference(self, model: nn.Module) -> None:
        """Use ``model``, frozen and in eval mode, as the reference (task.reference=copy)."""
        self._reference = [model.requires_grad_(False).eval()]

    @property
    def reference(self) -> nn.Module | None:
        if not self._reference:
            return None
        ref = self._reference[0]
        if next(ref.parameters()).device != self.device:  # follows the policy's device
            ref.to(self.device)
        return ref

    # -- log-probs ---------------------------------------------------------------------------

    @torch.no_grad()
    def reference_logps(self, batch, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache:
            rows = self.cache[split][batch["index"].clamp(min=0)]  # index -1: a blank
            return rows[:, 0], rows[:, 1]
        if self.reference is not None:
            return pair_logps(self.reference, batch)
        was = self.model.training  # the base model in eval mode, as a frozen copy would run
        self.model.eval()
        try:
            with adapters_off(self.model):
                return pair_logps(self.model, batch)
        finally:
            self.model.train(was)

    def pair_terms(self, batch, split: str):
        """(per-pair losses, real-pair mask, the per-pair values of METRICS)."""
        ref_c, ref_r = self.reference_logps(batch, split)
        pol_c, pol_r = pair_logps(self.model, batch)
        t = self.task
        losses, chosen, rejected = preference_loss(
            pol_c, pol_r, ref_c, ref_r, t.loss, t.beta, t.label_smoothing
        )
        real = batch["real"]  # False: a blank filling a rank's last batch
        values = torch.stack(
            [
                chosen,
                rejected,
                chosen - rejected,
                (chosen > rejected).float(),
                pol_c.detach(),
                pol_r.detach(),
            ]
        )  # (6, B), METRICS' order
        return losses, real, values

    # -- training and validation -------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        losses, real, values = self.pair_terms(batch, "train")
        weight = real.to(values.dtype)
        stats = torch.cat([(values * weight).sum(1), weight.sum().view(1)])
        self._stats = stats if self._stats is None else self._stats + stats
        self.count_tokens(batch["chosen_input_ids"].numel() + batch["rejected_input_ids"].numel())
        return self.step_loss((losses * weight).sum(), real.sum(), scale=self.pairs)

    def on_before_optimizer_step(self, optimizer) -> None:
        stats, self._stats = self._stats, None
        super().on_before_optimizer_step(optimizer)
        if stats is None or not self.logging_step():
            return
        if self.trainer.world_size > 1:
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
        means = (stats[:-1] / stats[-1].clamp(min=1)).tolist()
        row = {f"train/{k}": v for k, v in zip(METRICS, means, strict=True)}
        for logger in self.trainer.loggers:
            logger.log_metrics(row, step=self.trainer.global_step)

    def validation_step(self, batch, batch_idx):
        losses, real, values = self.pair_terms(batch, "val")
        weight = real.to(values.dtype)
        for key, v in zip(("loss", *METRICS), (losses.detach(), *values), strict=True):
            self.val_metrics[key.replace("/", "_")].update(v, weight=weight)

    def on_validation_epoch_end(self) -> None:
        for key in ("loss", *METRICS):
            metric = self.val_metrics[key.replace("/", "_")]
            # computed over all ranks already; sync_dist marks them so (a mean of equals)
            self.log(f"val/{key}", metric.compute(), prog_bar=key == "loss", sync_dist=True)
            metric.reset()

    # -- precomputed reference log-probs -----------------------------------------------------

    def on_validation_start(self) -> None:
        self.prepare_reference_cache()

    def on_train_start(self) -> None:
        super().on_train_start()
        self.prepare_reference_cache()

    def prepare_reference_cache(self) -> None:
        """Load or compute the reference log-probs of every train and val pair (once)."""
        if self.cache_path is None or self.cache:
            return
        dm = self.trainer.datamodule
        splits = {s: dm.sets[s] for s in ("train", "val")}
        key = hashlib.sha256(
            f"{self.reference_digest}|{pairs_digest(*splits.values())}"
            f"|{self.trainer.precision}".encode()
        ).hexdigest()
        strategy = self.trainer.strategy
        # Rank 0's reading for every rank: they all compute, or none does.
        cached = strategy.broadcast(
            read_cache(self.cache_path, key) if self.global_rank == 0 else None
        )
        if cached is None:
            cached = {s: self.compute_reference(dm, s) for s in splits}
            if self.trainer.is_global_zero:
                from lmforge.files import atomic_torch_save

                atomic_torch_save({"key": key, **cached}, self.cache_path)
            strategy.barrier()
            rank_zero_info(
                f"reference log-probs of {len(splits['train'])} + "
                f"{len(splits['val'])} pairs computed, kept in {self.cache_path}"
            )
        else:
            rank_zero_info(f"reference log-probs read from {self.cache_path}")
        self.cache = {split: logps.to(self.device) for split, logps in cached.items()}

    def compute_reference(self, dm, split: str) -> torch.Tensor:
        """(N, 2) reference log-probs of a split's pairs: each rank computes every world-th
        batch of pairs (as many batches on every rank, for sharded models), then they gather."""
        rank, world = self.global_rank, self.trainer.world_size
        n, b = len(dm.sets[split]), self.pairs
        batches = [list(range(s, min(s + b, n))) for s in range(0, n, b)]
        mine = batches[rank::world]
        rounds = -(-len(batches) // world)
        out = torch.zeros(rounds * b, 2, device=self.device)
        index = torch.full((rounds * b,), -1, dtype=torch.long, device=self.device)
        with self.trainer.precision_plugin.forward_context():
            for r in range(rounds):
                rows = mine[r] if r < len(mine) else batches[0]  # the same work on every rank
                pairs = [dm.sets[split][i] for i in rows]
                batch = self.trainer.strategy.batch_to_device(dm._collate()(pairs))
                c, j = self.reference_logps(batch, split)
                out[r * b : r * b + len(rows), 0], out[r * b : r * b + len(rows), 1] = c, j
                if r < len(mine):
                    index[r * b : r * b + len(rows)] = torch.tensor(rows, device=self.device)
        if world > 1:
            out = self.all_gather(out).reshape(-1, 2)
            index = self.all_gather(index).reshape(-1)
        result = torch.zeros(n, 2)
        keep = index >= 0
        result[index[keep].cpu()] = out[keep].float().cpu()
        return result

    # -- checkpoints -------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dpo_reference_sha256"] = self.reference_digest


def read_cache(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The cached reference log-probs at ``path`` if they are intact and of ``key``."""
    from lmforge.checkpoint import load_checkpoint

    if not path.is_file():
        return None
    try:
        cached = load_checkpoint(path)  # verified against its CRC-32s
    except LMForgeError as e:
        rank_zero_info(f"{e}; computing the reference log-probs again")
        return None
    if cached.get("key") != key:
        rank_zero_info(f"{path} holds the log-probs of another reference or data: computing again")
        return None
    return {s: cached[s] for s in ("train", "val")}


def reference_model(source: str, policy) -> nn.Module:
    """The model of ``task.reference_from``, refused unless it has the policy's architecture
    and tokenizer (``policy``: what ``init_from`` loaded)."""
    from dataclasses import fields

    from lmforge.checkpoint import load_model

    ref = load_model(source, causal=True, what="task.reference_from")
    a, b = ref.model.config, policy.model.config
    differ = [
        f"{f.name}={getattr(a, f.name)!r} (init_from: {getattr(b, f.name)!r})"
        for f in fields(b)
        if f.init and f.name != "dropout" and getattr(a, f.name, None) != getattr(b, f.name)
    ]
    if type(a) is not type(b):
        differ.insert(0, f"family {ref.family.name} (init_from: {policy.family.name})")
    if differ:
        raise LMForgeError(
            f"task.reference_from={source} holds another architecture than init_from ("
            + ", ".join(differ[:3])
            + "): use a checkpoint of the policy's architecture, or leave task.reference_from"
            " unset (the reference is then init_from)"
        )
    if ref.tokenizer is None or ref.tokenizer.to_str() != policy.tokenizer.to_str():
        raise LMForgeError(
            f"task.reference_from={source} was trained with another tokenizer than init_from:"
            " use a checkpoint with the policy's tokenizer, or leave task.reference_from unset"
        )
    return ref.model


def refuse_other_reference(ckpt_path: str | None, digest: str, task: DPOConfig) -> None:
    """A run resumes against the reference it started with, or not at all (checked before
    anything in the run directory is written)."""
    if ckpt_path is None:
        return
    path = Path(ckpt_path)
    meta = path / "meta.pt" if path.is_dir() else path
    saved = torch.load(meta, map_location="cpu", weights_only=True, mmap=not path.is_dir()).get(
        "dpo_reference_sha256"
    )
    if saved is not None and saved != digest:
        what = f"task.reference_from={task.reference_from}" if task.reference_from else "init_from"
        raise LMForgeError(
            f"the checkpoint {path} was trained against another reference model than {what}"
            " holds now: resume with the init_from (and task.reference_from) the run started"
            " with, or start a new run_name"
        )
