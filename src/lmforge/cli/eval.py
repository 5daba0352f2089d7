"""lmforge-eval: loss, perplexity and bits per byte of a checkpoint, on a prepared split or a text
file; or, with ``tasks=``, zero-shot benchmarks through lm-evaluation-harness (``lmforge[eval]``).

lmforge-eval ckpt_path=logs/causal_lm/<run>/checkpoints/last.ckpt data=shakespeare_char
lmforge-eval ckpt_path=exports/gpt2 text_file=book.txt stride=512
lmforge-eval ckpt_path=<checkpoint> tasks=hellaswag,arc_easy,lambada_openai
lmforge-eval ckpt_path=<checkpoint> tasks=shakespeare_mc include_path=data/shakespeare_mc
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, open_dict

from lmforge.cli import CONFIG_PATH, reports_errors
from lmforge.config import build
from lmforge.errors import LMForgeError


def main(cfg: DictConfig | None = None) -> dict:
    """The console script; ``tasks=a,b`` on the command line is taken as the list ``[a,b]``
    (Hydra would read it as a sweep). Called with a composed config, runs it."""
    if cfg is not None:
        return app(cfg)
    sys.argv[1:] = [
        f"tasks=[{a.removeprefix('tasks=')}]"
        if a.startswith("tasks=") and "," in a and a[6:7] not in "['\""
        else a
        for a in sys.argv[1:]
    ]
    return app()


@hydra.main(config_path=CONFIG_PATH, config_name="eval", version_base="1.3")
@reports_errors
def app(cfg: DictConfig) -> dict:
    import numpy as np
    import torch
    from rich.progress import Progress

    from lmforge.cli.generate import (
        describe,
        load_model_and_tokenizer,
        option,
        torch_device,
        unknown_characters,
    )
    from lmforge.evaluation import count_windows, evaluate

    positive = "use a positive number of tokens, or null for the default"
    option(cfg, "seq_len", int, lambda v: v >= 1, positive + " (the model's block_size)", True)
    option(cfg, "stride", int, lambda v: v >= 1, positive + " (seq_len)", True)
    option(cfg, "batch_size", int, lambda v: v >= 1, "use a positive number of windows")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise LMForgeError(f"precision={cfg.precision!r}: use auto, bf16 or fp32")
    device = torch_device(cfg.device)
    if cfg.tasks is not None:
        return harness(cfg, device)
    output = Path(cfg.output) if cfg.output else None
    if output is not None:
        check_output(output)
    model, tok = load_model_and_tokenizer(cfg.ckpt_path, cfg.tokenizer)
    seq_len = model.config.block_size if cfg.seq_len is None else cfg.seq_len
    stride = seq_len if cfg.stride is None else cfg.stride
    if seq_len > model.config.block_size:
        raise LMForgeError(
            f"seq_len={seq_len} must be in [1, block_size={model.config.block_size}]"
        )
    if stride > seq_len:
        raise LMForgeError(
            f"stride={stride} must be in [1, seq_len={seq_len}]: larger skips tokens"
        )
    if cfg.text_file is not None:
        path = Path(cfg.text_file)
        if not path.is_file():
            raise LMForgeError(f"text_file={path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LMForgeError(
                f"text_file={path} is not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None
        dropped, _, _ = unknown_characters(tok, text)
        if dropped:
            raise LMForgeError(
                f"text_file={path} holds characters the tokenizer does not know:"
                f" {describe(dropped)}; they would be skipped unscored: remove them, or evaluate a"
                " model whose tokenizer covers them"
            )
        streams = [np.asarray(tok.encode(text).ids, dtype=np.int64)]
        source = str(path)
    else:
        from lmforge.data.datasets import open_split
        from lmforge.data.prepare import prepare

        with open_dict(cfg):
            cfg.data.seq_len = seq_len  # the data config's default refers to a model config
        data = build(cfg.data, "data")
        if data.prepare is not None:
            prepare(data.prepare, data.dir)
        streams = open_split(data.dir, cfg.split)
        source = f"{data.dir}:{cfg.split}"
    if not any(len(s) > 1 for s in streams):
        raise LMForgeError(f"{source} holds fewer than 2 tokens: nothing to evaluate")
    if max(int(s.max()) for s in streams if len(s)) >= model.config.vocab_size:
        raise LMForgeError(
            f"{source} holds token ids beyond the model's vocabulary: another tokenizer?"
        )

    precision = (
        cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    )
    model.to(device)
    total = count_windows([len(s) for s in streams], seq_len, stride)
    with Progress(transient=True) as progress:
        bar = progress.add_task(f"evaluating {source}", total=total)
        result = evaluate(
            model,
            streams,
            seq_len,
            stride,
            cfg.batch_size,
            device,
            dtype=torch.bfloat16 if precision == "bf16" else None,
            on_batch=lambda n: progress.advance(bar, n),
        )
    # The scored text: every token of a stream but the first (special tokens decode to nothing).
    result.bytes = sum(len(tok.decode(np.asarray(s[1:]).tolist()).encode("utf-8")) for s in streams)
    out = {
        "source": source,
        "checkpoint": str(cfg.ckpt_path),
        "seq_len": seq_len,
        "stride": stride,
        "precision": precision,
        "tokens": result.tokens,
        "bytes": result.bytes,
        "loss": result.loss,
        "ppl": result.ppl,
        "bits_per_byte": result.bits_per_byte,
    }
    print(f"{'source':<40}{'tokens':>12}{'loss':>9}{'ppl':>10}{'bits/byte':>11}")
    print(
        f"{source[-40:]:<40}{result.tokens:>12,}{result.loss:>9.4f}{result.ppl:>10.3f}"
        f"{result.bits_per_byte or float('nan'):>11.4f}"
    )
    if output is not None:
        from lmforge.files import atomic_write_bytes

        atomic_write_bytes(output, json.dumps(out, indent=2).encode())
    return out


def check_output(output: Path) -> None:
    """Refuse an ``output=`` that cannot be written, before the evaluation, or that would
    overwrite a file lmforge-eval did not write (a result of an earlier run is replaced)."""
    if not output.parent.is_dir():
        raise LMForgeError(f"output={output}: directory {output.parent} does not exist; create it")
    if output.is_dir():
        raise LMForgeError(f"output={output} is a directory: name a JSON file to write")
    if not os.access(output.parent, os.W_OK):
        raise LMForgeError(f"output={output}: directory {output.parent} is not writable")
    if output.exists():
        try:
            earlier = json.loads(output.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            earlier = None
        if not (
            isinstance(earlier, dict)
            and "checkpoint" in earlier
            and ("bits_per_byte" in earlier or "lm_eval" in earlier)
        ):
            raise LMForgeError(
                f"output={output} exists and is not a result of lmforge-eval: it is left as it"
                " is; name another file"
            )


def harness(cfg: DictConfig, device) -> dict:
    """``tasks=...``: run lm-evaluation-harness on the checkpoint (the ``lmforge`` backend),
    write the results beside it (``<name>.lm_eval.json``, or ``output=``) and log them to W&B."""
    tasks = [cfg.tasks] if isinstance(cfg.tasks, str) else list(cfg.tasks)
    tasks = [str(t).strip() for t in tasks if str(t).strip()]
    if not tasks:
        raise LMForgeError("tasks= names no task: e.g. tasks=hellaswag,arc_easy")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LMForgeError(
            "tasks= runs lm-evaluation-harness, which is not installed: pip install 'lmforge[eval]'"
        ) from None
    from lmforge.cli.generate import option
    from lmforge.harness import LMForgeLM, results_path

    option(cfg, "num_fewshot", int, lambda v: v >= 0, "use 0 or more examples, or null", True)
    option(cfg, "limit", int, lambda v: v >= 1, "use a positive number of documents, or null", True)
    if cfg.ckpt_path is None:
        raise LMForgeError("no checkpoint given: pass ckpt_path=<run dir>/checkpoints/last.ckpt")
    output = Path(cfg.output) if cfg.output else results_path(cfg.ckpt_path)
    check_output(output)
    include = None
    if cfg.include_path is not None:
        include = (
            [cfg.include_path] if isinstance(cfg.include_path, str) else list(cfg.include_path)
        )
        for path in include:
            if not Path(path).is_dir():
                raise LMForgeError(f"include_path={path}: no such directory of task YAML files")
    manager = None
    if include is not None:  # local tasks alone need not index the harness's 10,000+ files
        manager = TaskManager(include_path=include, include_defaults=False)
        if not set(tasks) <= set(manager.all_tasks):
            manager = None
    manager = manager or TaskManager(include_path=include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LMForgeError(
            f"tasks={','.join(unknown)}: not a task of lm-evaluation-harness"
            + (f" or of {', '.join(include)}" if include else "")
            + ": see `lm_eval ls tasks`, or add include_path=<directory of task YAML files>"
        )
    dtype = {"auto": "auto", "bf16": "bf16", "fp32": "fp32"}[cfg.precision]
    lm = LMForgeLM(cfg.ckpt_path, cfg.tokenizer, cfg.batch_size, str(device), cfg.seq_len, dtype)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=manager,
        apply_chat_template=bool(cfg.apply_chat_template),
        log_samples=bool(cfg.log_samples),
        bootstrap_iters=0,
    )
    out = {
        "checkpoint": str(cfg.ckpt_path),
        "lm_eval": lm_eval.__version__,
        "tasks": tasks,
        "num_fewshot": cfg.num_fewshot,
        "limit": cfg.limit,
        "truncated": lm.truncated,
        "results": results["results"],
        "n-shot": results.get("n-shot"),
        "n-samples": results.get("n-samples"),
        "versions": results.get("versions"),
    }
    if cfg.log_samples:
        out["samples"] = results.get("samples")
    from lmforge.files import atomic_write_bytes

    atomic_write_bytes(output, json.dumps(out, indent=2, default=str).encode())
    print(f"{'task':<30}{'metric':<24}{'value':>10}")
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not key.endswith("_stderr,none"):
                print(f"{task[:29]:<30}{key[:23]:<24}{value:>10.4f}")
    print(f"results: {output}")
    log_to_wandb(cfg, out, output.parent)
    return out


def log_to_wandb(cfg: DictConfig, out: dict, directory: Path) -> None:
    """The harness's numbers as one W&B run (job_type eval): ``<task>/<metric>`` in its
    summary. ``wandb``: auto (online when logged in, else offline) | online | offline | disabled."""
    from lmforge.loggers import wandb_mode

    mode = wandb_mode(cfg.wandb)
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(
        project=cfg.wandb_project,
        job_type="eval",
        dir=str(directory),
        mode=mode,
        config={k: out[k] for k in ("checkpoint", "tasks", "num_fewshot", "limit", "lm_eval")},
    )
    try:
        row = {
            f"{task}/{key.removesuffix(',none')}": value
            for task, metrics in out["results"].items()
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        run.log(row)
        run.summary.update(row)
    finally:
        run.finish()


if __name__ == "__main__":
    main()
