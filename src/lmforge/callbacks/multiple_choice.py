"""Zero-shot multiple-choice accuracy during training (HellaSwag-style), logged beside the loss.

Every ``every_n_steps`` optimizer steps (and after the last), each set named in ``sets`` is
scored: for every item, each choice is appended to the context and its summed log-probability
computed; ``eval/<name>/acc`` counts the items whose right choice scores highest, and
``eval/<name>/acc_norm`` those whose right choice scores highest per character (the harness's
``acc`` and ``acc_norm``, by the same code as ``lmforge-eval tasks=...``: ``lmforge.downstream``).

Under DDP or FSDP each rank scores its share of the items (every world-size-th), and the counts
are summed across ranks once per evaluation (one all-reduce); every rank runs as many forwards
as the busiest, as a sharded model needs.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lmforge.config import build
from lmforge.downstream import MCCounts, MCItem, MCSet, Pair, evaluate_mc, mc_pairs, read_mc_set
from lmforge.errors import LMForgeError


class MultipleChoice(L.Callback):
    def __init__(self, sets: dict, every_n_steps: int = 500, batch_size: int = 16) -> None:
        """``sets``: {name: {path, format, delimiter, limit}} (``lmforge.downstream.MCSet``)."""
        if (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise LMForgeError(
                f"callbacks.multiple_choice.every_n_steps={every_n_steps!r}: use a positive"
                " number of optimizer steps"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LMForgeError(
                f"callbacks.multiple_choice.batch_size={batch_size!r}: use a positive number"
                " of sequences"
            )
        self.every_n_steps, self.batch_size = every_n_steps, batch_size
        self.sets: dict[str, MCSet] = {
            str(name): build(node, f"callbacks.multiple_choice.sets.{name}", MCSet)
            for name, node in (sets or {}).items()
        }
        self.items: dict[str, list[MCItem]] = {
            name: read_mc_set(s.path, s.format, s.limit) for name, s in self.sets.items()
        }
        self.pairs: dict[str, list[Pair]] = {}  # tokens of each item's choices, by set
        self.results: dict[str, MCCounts] = {}  # of the latest evaluation
        self.seconds = 0.0  # wall time of the latest evaluation
        self.evaluated_at = -1
        self.reported: set[str] = set()  # sets whose truncation or dropped characters were told

    def on_fit_start(self, trainer, pl_module) -> None:
        """Tokenise the sets with the run's tokenizer, before any step: a choice longer than the
        model's context stops the run now rather than at the first evaluation."""
        dm = getattr(trainer, "datamodule", None)
        tok = getattr(dm, "tokenizer", None)
        if not self.items or tok is None or not hasattr(pl_module.model, "generate"):
            return  # an encoder (BERT) is not scored left to right
        from lmforge.data.tokenizer import document_separator

        def encode(text: str) -> list[int]:
            return tok.encode(text, add_special_tokens=False).ids

        if trainer.fast_dev_run:  # one batch of everything: the first items of each set
            for name, items in self.items.items():
                n, pairs = 1, len(items[0].choices)
                while n < len(items) and pairs + len(items[n].choices) <= self.batch_size:
                    pairs, n = pairs + len(items[n].choices), n + 1
                self.items[name] = items[:n]
        for name, items in self.items.items():
            self.check_characters(name, tok, items)
            s = self.sets[name]
            self.pairs[name] = mc_pairs(
                encode,
                items,
                pl_module.model.config.block_size,
                s.delimiter,
                document_separator(tok),
                f"callbacks.multiple_choice.sets.{name} ({s.path})",
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self.evaluated_at:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self.evaluated_at:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.pairs:
            return
        self.evaluated_at = trainer.global_step
        start = time.perf_counter()
        model = pl_module.model
        max_len = model.config.block_size
        rank, world = trainer.global_rank, trainer.world_size
        was_training = pl_module.training
        pl_module.eval()
        counts = []
        try:
            for name, pairs in self.pairs.items():
                items = self.items[name]
                starts = [0]  # each item's first pair
                for item in items:
                    starts.append(starts[-1] + len(item.choices))
                mine = range(rank, len(items), world)
                busiest = max(sum(len(i.choices) for i in items[r::world]) for r in range(world))
                got = evaluate_mc(
                    model,
                    [items[i] for i in mine],
                    [p for i in mine for p in pairs[starts[i] : starts[i + 1]]],
                    max_len,
                    batch_size=self.batch_size,
                    device=pl_module.device,
                    min_batches=-(-busiest // self.batch_size),  # the busiest rank's forwards
                )
                counts.append(got.as_list())
        finally:
            pl_module.train(was_training)
        total = torch.tensor(counts, dtype=torch.long, device=pl_module.device)
        if world > 1:
            total = trainer.strategy.reduce(total, reduce_op="sum")
        metrics = {}
        for name, row in zip(self.pairs, total.tolist()):
            c = self.results[name] = MCCounts(*row)
            metrics[f"eval/{name}/acc"] = c.acc
            metrics[f"eval/{name}/acc_norm"] = c.acc_norm
            if c.truncated and name + ":truncated" not in self.reported:
                self.reported.add(name + ":truncated")
                rank_zero_warn(
                    f"eval/{name}: {c.truncated} of {c.items} items are longer than the model's"
                    f" {max_len}-token context: truncated from the left"
                )
        self.seconds = time.perf_counter() - start
        rank_zero_info(
            f"step {trainer.global_step}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            + f" ({self.seconds:.2f} s)"
        )
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def check_characters(self, name: str, tok, items: list[MCItem]) -> None:
        """Warn once when the tokenizer drops characters of a set (a character tokenizer has no
        unknown token): those choices are scored without them."""
        if name + ":chars" in self.reported:
            return
        self.reported.add(name + ":chars")
        from lmforge.cli.generate import describe, unknown_characters

        text = "".join(i.context + self.sets[name].delimiter + "".join(i.choices) for i in items)
        dropped, _, _ = unknown_characters(tok, text)
        if dropped:
            rank_zero_warn(
                f"eval/{name}: the tokenizer drops {describe(dropped)}: those characters are not"
                " scored"
            )
