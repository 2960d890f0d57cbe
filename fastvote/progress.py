"""The one rule for progress bars: shown when asked for (progress=True) and
the output is a terminal; a log file or a pipe gets no bars (tqdm's
disable=None), so it does not fill with 0% lines and escape codes."""
from __future__ import annotations

from typing import Optional


def disable(progress: bool) -> Optional[bool]:
    """tqdm's `disable=` for a caller's `progress` flag."""
    return None if progress else True
