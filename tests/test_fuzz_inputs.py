"""Bad inputs across every command (bench/fuzz_inputs.py); consolidate's output refusals."""

import subprocess
import sys

import pytest

from lmforge.cli.consolidate import main as consolidate_main

from .conftest import ROOT


@pytest.mark.slow
def test_every_bad_input_is_refused_in_one_line_leaving_user_files_alone():
    """About 90 bad inputs, each its own process (some minutes on two cores)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fuzz_inputs.py")],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]


def test_consolidate_refuses_to_write_over_a_file_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "mine.txt"
    mine.write_text("the user's own")
    for target, message in [
        (mine, f"error: -o {mine} exists and is not a checkpoint of lmforge"),
        (tmp_path, f"error: -o {tmp_path} is a directory"),
    ]:
        with pytest.raises(SystemExit) as exit_:  # refused before the checkpoint is read
            consolidate_main([str(tmp_path / "sharded"), "-o", str(target)])
        assert exit_.value.code == 2 and capsys.readouterr().err.startswith(message)
    assert mine.read_text() == "the user's own"
