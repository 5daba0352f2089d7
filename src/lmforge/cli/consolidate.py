"""lmforge-consolidate: turn a sharded (FSDP) checkpoint directory into one checkpoint file.

    lmforge-consolidate logs/causal_lm/<run>/checkpoints/last.ckpt [-o model.ckpt]

The file holds the full model weights, the model config and the tokenizer, for
``lmforge-generate``, ``lmforge-eval`` and the Hugging Face exports. Optimizer states stay in
the sharded directory, from which training resumes (``ckpt_path=...``) on any number of ranks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmforge.cli import reports_errors
from lmforge.errors import LMForgeError


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lmforge-consolidate",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  lmforge-consolidate logs/causal_lm/my_run/checkpoints/last.ckpt
  lmforge-consolidate logs/causal_lm/my_run/checkpoints/last.ckpt -o model.ckpt
  lmforge-consolidate logs/causal_lm/my_run/checkpoints/step2000.ckpt -o step2000.ckpt""",
    )
    parser.add_argument("checkpoint", help="sharded checkpoint directory written by trainer=fsdp")
    parser.add_argument(
        "-o", "--output", help="file to write (default: <name>.consolidated.ckpt beside it)"
    )
    args = parser.parse_args(argv)
    from lmforge.checkpoint import checkpoint_step, consolidate

    if args.output is not None:
        output = Path(args.output)
        if output.is_dir():
            raise LMForgeError(f"-o {output} is a directory: name the checkpoint file to write")
        if output.exists() and checkpoint_step(output) is None:
            raise LMForgeError(
                f"-o {output} exists and is not a checkpoint of lmforge: it is left as it is;"
                " name another file"
            )
    out = consolidate(args.checkpoint, args.output)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
