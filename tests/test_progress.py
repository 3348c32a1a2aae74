"""Progress bars: rate and time left in a terminal; in a log (no terminal) one line per epoch and no bar."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from pipeline.core.progress import log_line, progress
from support.helpers import ROOT

WORKER = [sys.executable, str(ROOT / "tests/support/progress_worker.py")]
EPOCH_LINE = re.compile(r"^  fold [01] \| epoch +[123] \| loss \d+\.\d{4}( \| test AP \d+\.\d{4})? \| \d+\.\d+s$")
# tqdm's "n/total [elapsed<remaining, rate]"
BAR = r"{n}/{total} \[\d\d:\d\d<\d\d:\d\d, +(\d+\.\d+|\?)({unit}/s|s/{unit})\]"


def _environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _in_terminal(command: list[str]) -> str:
    """What ``command`` writes to stdout and stderr when both are a terminal (a pseudo-terminal)."""
    leader, follower = pty.openpty()
    # A new pseudo-terminal is 0 columns wide, and tqdm fits its bar into that: give it a real width.
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    # tqdm redraws at most every 0.1 s and a transient bar (an epoch's batches) is cleared without
    # drawing its last state: on a fast machine a short loop would show no rate at all. Draw every step.
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        env={**_environment(), "TQDM_MININTERVAL": "0"},
        cwd=ROOT,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the follower side is closed: the process has exited
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=300) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_without_a_terminal_the_log_holds_one_line_per_epoch_and_no_bar(tmp_path):
    # Bytes, not text: text mode would turn a bar's carriage returns into newlines.
    result = subprocess.run([*WORKER, str(tmp_path)], capture_output=True, env=_environment(), cwd=ROOT, timeout=300)
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stderr[-3000:]
    assert "\r" not in stdout + stderr
    epochs = [line for line in stdout.splitlines() if "| epoch" in line]
    assert len(epochs) == 2 * 3 and all(EPOCH_LINE.match(line) for line in epochs), epochs
    assert re.search(r"^skipped .*broken\.png: ", stderr, re.MULTILINE)  # on a line of its own
    assert not re.search(r"\d+/\d+ \[\d\d:\d\d<", stdout + stderr)


@pytest.mark.slow
def test_in_a_terminal_each_loop_shows_a_bar_with_rate_and_time_left(tmp_path):
    output = _in_terminal([*WORKER, str(tmp_path)])
    assert "\r" in output
    for name, n, total, unit in (
        ("fold 0", 3, 3, "epoch"),
        ("fold 1", 3, 3, "epoch"),
        ("epoch 3", 3, 3, "batch"),
        ("saliency fold 0", 4, 4, "batch"),
        ("predict", 4, 4, "file"),
    ):
        assert re.search(re.escape(name) + r":.*" + BAR.format(n=n, total=total, unit=unit), output), name
    # The per-epoch line stays whole: the bar is cleared for it and drawn again below.
    lines = [line.rsplit("\r", 1)[-1] for line in output.replace("\r\n", "\n").split("\n")]
    epochs = [line.strip("\x1b[A") for line in lines if "| epoch" in line]
    assert len(epochs) == 6 and all(EPOCH_LINE.match(line) for line in epochs), epochs


def test_progress_off_where_stderr_is_no_terminal_and_for_other_ranks(capsys):
    assert list(progress(range(3), "loop")) == [0, 1, 2]  # pytest's captured stderr is no terminal
    assert progress(range(3), "loop").disable and progress(range(3), "loop", shown=False).disable
    log_line("one line")
    captured = capsys.readouterr()
    assert captured.out == "one line\n" and captured.err == ""
