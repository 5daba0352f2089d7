"""lmforge-prepare: tokenize a corpus into token shards (``lmforge-prepare data=gutenberg_bpe``)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lmforge.cli import CONFIG_PATH, reports_errors
from lmforge.config import build
from lmforge.errors import LMForgeError


@hydra.main(config_path=CONFIG_PATH, config_name="prepare", version_base="1.3")
@reports_errors
def main(cfg: DictConfig) -> None:
    from lmforge.data.prepare import prepare

    data = build(cfg.data, "data")
    if not isinstance(cfg.force, bool):
        raise LMForgeError(f"force={cfg.force!r}: use true or false")
    if data.prepare is None:
        raise LMForgeError(
            f"data config for {data.dir} has no `prepare` section: nothing to build it from"
        )
    had_set = (Path(data.dir) / "meta.json").is_file()
    try:
        meta = prepare(data.prepare, data.dir, force=cfg.force)
    except KeyboardInterrupt:
        kept = "the previous set is intact" if had_set else "nothing was written"
        print(f"stopped by Ctrl-C: {data.dir} is unchanged ({kept})", file=sys.stderr, flush=True)
        sys.exit(130)
    docs = meta["documents"]
    print(
        f"{data.dir}: vocab {meta['vocab_size']:,} ({meta['dtype']}), {docs['read']:,} documents read, "
        f"{docs['duplicates_removed']:,} duplicates and {docs['too_short']:,} too short removed"
    )
    for name, split in meta["splits"].items():
        print(
            f"  {name}: {split['documents']:,} documents, {split['tokens']:,} tokens in {len(split['shards'])} shard(s)"
        )
    t = meta["throughput"]
    print(f"  {t['text_mb_per_s']} MB/s, {t['tokens_per_s']:,} tokens/s over {t['seconds']} s")


if __name__ == "__main__":
    main()
