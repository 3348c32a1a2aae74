"""Progress of long loops: a tqdm bar with rate and time left in a terminal, nothing in a log.

A bar redraws its line with carriage returns; in a CI log or a file that is a pile of half
lines. Bars are therefore drawn only where stderr is a terminal (tqdm's ``disable=None``), and a
loop's own one-line messages (``training.format_epoch``) go through ``log_line``, which keeps a
bar below them intact in a terminal and is a plain print everywhere else.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(
    items: Iterable[T] | None,  # None: a bar updated by hand
    what: str,
    unit: str = "it",
    total: int | None = None,
    initial: int = 0,
    leave: bool = True,
    shown: bool = True,
) -> tqdm:
    """``items`` with a bar named ``what`` counting ``unit``s, in a terminal only; ``shown=False``
    (a training process other than rank 0, say) never draws one."""
    return tqdm(
        items,
        desc=what,
        unit=unit,
        total=total,
        initial=initial,
        leave=leave,
        disable=None if shown else True,
        dynamic_ncols=True,
    )


def log_line(text: str) -> None:
    """Print one line of a loop's log on stdout, above any bar that is drawn."""
    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()  # a stage's log reaches DVC as it happens, not when the buffer fills


@contextmanager
def bars_paused() -> Iterator[None]:
    """Bars cleared while another program (a ``dvc exp run``) writes to the same terminal."""
    with tqdm.external_write_mode():
        yield
