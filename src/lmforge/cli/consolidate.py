"""lmforge-consolidate: turn a sharded (FSDP) checkpoint directory into one checkpoint file.

    lmforge-consolidate logs/causal_lm/<run>/checkpoints/last.ckpt [-o model.ckpt]

The file holds the full model weights, the model config and the tokenizer, for
``lmforge-generate``, ``lmforge-eval`` and the Hugging Face exports. Optimizer states stay in
the sharded directory, from which training resumes (``ckpt_path=...``) on any number of ranks.
"""

from __future__ import annotations

import argparse
import sys

from lmforge.cli import reports_errors


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmforge-consolidate", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="sharded checkpoint directory written by trainer=fsdp")
    parser.add_argument(
        "-o", "--output", help="file to write (default: <name>.consolidated.ckpt beside it)"
    )
    args = parser.parse_args(argv)
    from lmforge.checkpoint import consolidate

    out = consolidate(args.checkpoint, args.output)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
