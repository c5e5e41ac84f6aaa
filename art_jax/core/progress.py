"""Progress bars for long jobs: rate and ETA on stderr, cleared when the job fails so
that the error stays the one line the user reads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tqdm import tqdm


@contextlib.contextmanager
def progress_bar(**kwargs) -> Iterator[tqdm]:
    """A tqdm bar; shown by process 0 only in a multi-process job."""
    from art_jax.core.distributed import is_lead

    bar = tqdm(**{**kwargs, "disable": kwargs.get("disable", False) or not is_lead()})
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()
