"""Float tolerances derived from the computation, for results compared across machines, thread
counts, kernel sets (``ATEN_CPU_CAPABILITY``) or batch compositions.

Such a change only reorders floating-point operations: each rounded operation may then land one
unit in the last place (``eps`` of its dtype, relative to its magnitude) elsewhere. A value that
accumulates ``num_terms`` such terms of size at most ``magnitude`` may differ by at most about
``ulps * eps * num_terms * magnitude``. Token ids, ancestors and resampling flags are not
compared with a tolerance: they must be equal.
"""

from __future__ import annotations

import torch


def rounding_tolerance(
    num_terms: int, magnitude: float = 1.0, dtype: torch.dtype = torch.float32, ulps: float = 1.0
) -> float:
    """``ulps * eps(dtype) * num_terms * magnitude``: ``ulps`` units in the last place of
    ``dtype`` for each of ``num_terms`` accumulated terms of size at most ``magnitude``."""
    return ulps * torch.finfo(dtype).eps * num_terms * magnitude
