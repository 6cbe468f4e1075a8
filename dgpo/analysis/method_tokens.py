"""One method's column of Figure 4: the tokens and the weight the method gave each of them.

Shared by :mod:`~dgpo.analysis.figure4`, which builds it, and :mod:`~dgpo.analysis.figure4_plots`,
which draws it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class MethodTokens:
    """One method's column of Figure 4: tokens and the weight the method gave each of them.

    Attributes:
        method: the method's name (``"grpo"``, ...).
        label: display name; says whose tokens when the weight is counterfactual.
        tokens: the recorded tokens (see :data:`dgpo.analysis.schema.COLUMNS`).
        weight: the method's weight per token, expressed as ``kind``.
        kind: ``"relative"``, ``"prob"`` or ``"logprob"`` (see :mod:`dgpo.analysis.weights`).
        counterfactual: the method did not train on these tokens; ``weight`` is what it would
            have applied.
        clip_low: ε_l of the run (``None``: no lower boundary).
        clip_high: ε_h of the run.
        hparams: the method's hyper-parameters as recorded (to draw its analytic curve).
    """

    method: str
    label: str
    tokens: pd.DataFrame
    weight: np.ndarray
    kind: str
    counterfactual: bool
    clip_low: float | None
    clip_high: float
    hparams: dict[str, Any] = field(default_factory=dict)
