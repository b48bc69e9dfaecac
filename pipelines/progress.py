"""Progress bars for long CLI work (components take a plain `progress(n)` callback)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def progress_bar(total: int, desc: str, unit: str = "img") -> Iterator[Callable[[int], None]]:
    with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5) as bar:
        yield bar.update
