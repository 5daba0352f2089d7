"""The lm-evaluation-harness backend: any lmforge checkpoint or imported transformers directory
as the harness's model ``lmforge`` (``pip install 'lmforge[eval]'``).

    from lmforge.harness import LMForgeLM
    lm = LMForgeLM("logs/causal_lm/<run>/checkpoints/last.ckpt")
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

or ``lmforge-eval ckpt_path=... tasks=hellaswag,arc_easy``. Importing this module registers the
name, so ``simple_evaluate(model="lmforge", model_args="pretrained=<path>")`` works as well.

``loglikelihood`` and ``loglikelihood_rolling`` score through ``lmforge.downstream``, the same
code as the multiple-choice callback of training runs; ``generate_until`` decodes with the KV
cache. A masked LM (BERT) is refused: its masked-token scores are not the left-to-right
log-likelihoods the harness's tasks compare. One process: the harness's data-parallel mode is
not supported.
"""

from __future__ import annotations

import json
import logging
from itertools import groupby
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lmforge.downstream import loglikelihoods, score
from lmforge.errors import LMForgeError

log = logging.getLogger(__name__)


@register_model("lmforge")
class LMForgeLM(TemplateLM):
    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        batch_size: int | str = 16,
        device: str | None = None,
        max_length: int | None = None,
        dtype: str = "auto",
        max_gen_toks: int = 256,
        **kwargs,
    ) -> None:
        """``pretrained``: a checkpoint of lmforge-train or a transformers directory;
        ``tokenizer``: a tokenizer.json for one that carries none; ``max_length``: the tokens of
        context (default the model's block_size); ``dtype``: auto (bf16 on CUDA) | bf16 | fp32."""
        super().__init__()
        from lmforge.cli.generate import load_for_generation, torch_device

        if dtype not in ("auto", "bf16", "fp32"):
            raise LMForgeError(f"dtype={dtype!r}: use auto, bf16 or fp32")
        self.model, self.tok, self.settings = load_for_generation(
            pretrained,
            tokenizer,
            what="the lm-evaluation-harness backend (a masked LM's scores are not the"
            " left-to-right log-likelihoods its tasks compare)",
        )
        self._device = torch_device(device)
        self.model.to(self._device).eval()
        block = self.model.config.block_size
        self.max_length = block if max_length is None else int(max_length)
        if not 1 <= self.max_length <= block:
            raise LMForgeError(f"max_length={max_length}: use 1 to the model's block_size {block}")
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto": 16
        self.max_gen_toks = int(max_gen_toks)
        cuda = self._device.type == "cuda"
        self.dtype = torch.bfloat16 if dtype == "bf16" or (dtype == "auto" and cuda) else None
        self.pretrained = str(pretrained)
        self.truncated = 0  # requests cut from the left to fit max_length, over all calls
        if kwargs:
            log.warning("lmforge backend: ignored arguments %s", ", ".join(sorted(kwargs)))

    # --- tokens ---------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        from lmforge.data.tokenizer import document_separator

        eos = self.settings.eos_token if self.settings else None
        i = self.tok.token_to_id(eos) if eos else None
        i = i if i is not None else document_separator(self.tok)
        if i is None:
            raise LMForgeError(
                f"{self.pretrained}: the tokenizer has no end-of-text token (<|endoftext|>,"
                " [SEP] or an eos_token): tasks that score whole documents or empty contexts"
                " need one"
            )
        return i

    def _prefix_id(self) -> int | None:
        try:
            return self.eot_token_id
        except LMForgeError:
            return None  # only an empty context needs it: downstream says so then

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        return self.tok.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int], **kwargs) -> str:
        return self.tok.decode(list(tokens))

    # --- scoring --------------------------------------------------------------------------

    def _score_kwargs(self) -> dict:
        return {"batch_size": self.batch_size, "device": self._device, "dtype": self.dtype}

    def _count(self, truncated: int, what: str) -> None:
        if truncated:
            self.truncated += truncated
            log.warning(
                "%d %s longer than the model's %d-token context: truncated from the left",
                truncated,
                what,
                self.max_length,
            )

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Summed log-probability of each (context, continuation) and whether it is greedy:
        ``lmforge.downstream.loglikelihoods``, the scoring of the training callback."""
        scores = loglikelihoods(
            self.model,
            self.tok_encode,
            [r.args for r in requests],
            self.max_length,
            self._prefix_id(),
            **self._score_kwargs(),
        )
        self._count(scores.truncated, "loglikelihood requests")
        for r, lp, g in zip(requests, scores.logprobs, scores.greedy):
            self.cache_hook.add_partial("loglikelihood", r.args, (lp, g))
        return list(zip(scores.logprobs, scores.greedy))

    def _loglikelihood_tokens(self, requests, **kwargs) -> list[tuple[float, bool]]:
        scores = score(
            self.model, [(c, t) for _, c, t in requests], self.max_length, **self._score_kwargs()
        )
        return list(zip(scores.logprobs, scores.greedy))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, every token predicted once: the harness's rolling
        windows of ``max_length`` tokens after an end-of-text token."""
        pairs, owner = [], []
        for n, (text,) in enumerate(r.args for r in requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.eot_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, cont in map(make_disjoint_window, windows):
                pairs.append((ctx, cont))
                owner.append(n)
        scores = score(self.model, pairs, self.max_length, **self._score_kwargs())
        totals = [0.0] * len(requests)
        for n, lp in zip(owner, scores.logprobs):
            totals[n] += lp
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    # --- generation -----------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, ``do_sample``) continuations until a stop string, the end-of-text
        token or ``max_gen_toks``, decoded with the KV cache; requests of equal context length
        and settings share a batch."""
        eot = self._prefix_id()
        encoded, cut = [], 0
        for i, r in enumerate(requests):
            context, gen_kwargs = r.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise LMForgeError(
                    f"max_gen_toks={max_new} leaves no room for a context in the model's"
                    f" {self.max_length} tokens: ask for fewer"
                )
            ids = self.tok_encode(context) or ([eot] if eot is not None else [])
            if not ids:
                raise LMForgeError(f"generation request {i}: the context encodes to no tokens")
            keep = self.max_length - max_new
            cut += len(ids) > keep
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            key = json.dumps([until, max_new, temperature])
            encoded.append((len(ids[-keep:]), key, i, ids[-keep:], until, max_new, temperature))
        self._count(cut, "generation contexts (less max_gen_toks)")
        out = [""] * len(requests)
        encoded.sort(key=lambda e: (e[1], -e[0]))
        for _, group in groupby(encoded, key=lambda e: (e[0], e[1])):
            group = list(group)
            for b in range(0, len(group), self.batch_size):
                batch = group[b : b + self.batch_size]
                _, _, _, _, until, max_new, temperature = batch[0]
                texts = self._generate([e[3] for e in batch], until, max_new, temperature, eot)
                for e, text in zip(batch, texts):
                    out[e[2]] = text
                    self.cache_hook.add_partial("generate_until", requests[e[2]].args, text)
        return out

    @torch.no_grad()
    def _generate(self, contexts, until, max_new, temperature, eot) -> list[str]:
        idx = torch.tensor(contexts, device=self._device)
        gen = torch.Generator(device=self._device).manual_seed(1234)
        new: list[list[int]] = [[] for _ in contexts]
        done = [False] * len(contexts)
        with torch.autocast(self._device.type, dtype=self.dtype, enabled=self.dtype is not None):
            steps = self.model.generate_stream(idx, max_new, temperature=temperature, generator=gen)
            for nxt in steps:
                for row, token in enumerate(nxt[:, 0].tolist()):
                    if done[row]:
                        continue
                    if token == eot:
                        done[row] = True
                        continue
                    new[row].append(token)
                    done[row] = any(s and s in self.tok_decode(new[row]) for s in until)
                if all(done):
                    break
        return [postprocess_generated_text(self.tok_decode(r), until, None) for r in new]

    # --- chat -----------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return "lmforge:" + self.pretrained.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.settings.chat_template if self.settings else None

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt=True) -> str:
        """The conversation through the checkpoint's chat template (its tokenizer_config.json)."""
        from lmforge.data.chat import ChatTemplate

        if self.settings is None or self.settings.chat_template is None:
            where = self.settings.source if self.settings else self.pretrained
            raise LMForgeError(
                f"apply_chat_template=true, but there is no chat template in {where}: evaluate"
                " without it, or a model whose tokenizer_config.json holds one"
            )
        template = ChatTemplate(self.settings.chat_template, self.settings, self.settings.source)
        return template.render(chat_history, add_generation_prompt)


def results_path(ckpt_path: str | Path) -> Path:
    """Where ``lmforge-eval tasks=...`` writes its results: beside the checkpoint
    (``last.ckpt`` -> ``last.lm_eval.json``; a transformers directory ``exports/gpt2`` ->
    ``exports/gpt2.lm_eval.json``)."""
    path = Path(ckpt_path)
    return path.with_name(path.name.removesuffix(".ckpt") + ".lm_eval.json")
