"""Progress bars on stderr (tqdm): counts, rate and ETA for every long step.

Bars show on a terminal and stay silent in pipes and logs; ``-q`` turns them off everywhere.
"""
from __future__ import annotations

import sys
from typing import Any

#: None: show on a terminal only; False: never (``-q``); True: always.
enabled: bool | None = None


def bar(total: int | None, desc: str, unit: str = "img", **kw: Any) -> Any:
    from tqdm.auto import tqdm

    disable = None if enabled is None else not enabled
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable,
                dynamic_ncols=True, leave=False, **kw)
