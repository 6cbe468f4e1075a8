"""Policy losses: PG, GRPO, CISPO, GPPO, CE-GPPO, ASPO and DGPO behind one contract.

Build one by name with :func:`build_loss`, or by class (``class_path``/``init_args`` in YAML).
"""

from __future__ import annotations

from typing import Any

from dgpo.losses.aspo import ASPOLoss
from dgpo.losses.base import AGGREGATIONS, REGION_NAMES, LossOutput, PolicyLoss, aggregate, regions
from dgpo.losses.ce_gppo import CEGPPOLoss
from dgpo.losses.cispo import CISPOLoss
from dgpo.losses.dgpo import DGPOLoss
from dgpo.losses.gppo import GPPOLoss
from dgpo.losses.grpo import GRPOLoss
from dgpo.losses.kl import k3_kl
from dgpo.losses.pg import PGLoss

#: The built-in losses by name.
LOSSES: dict[str, type[PolicyLoss]] = {
    "pg": PGLoss,
    "grpo": GRPOLoss,
    "cispo": CISPOLoss,
    "gppo": GPPOLoss,
    "ce_gppo": CEGPPOLoss,
    "aspo": ASPOLoss,
    "dgpo": DGPOLoss,
}


def build_loss(name: str, **hparams: Any) -> PolicyLoss:
    """Build a built-in loss by name with its hyper-parameters.

    Args:
        name: one of ``LOSSES`` (``"pg"``, ``"grpo"``, ``"cispo"``, ``"gppo"``, ``"ce_gppo"``,
            ``"aspo"``, ``"dgpo"``).
        **hparams: keyword arguments of the loss class.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).

    Example:
        >>> build_loss("dgpo", n=2, m=2)
        DGPOLoss(clip_low=0.2, clip_high=0.2, agg='token-mean', norm_length=None, n=2, m=2)
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}")
    return LOSSES[name](**hparams)


__all__ = [
    "AGGREGATIONS",
    "ASPOLoss",
    "CEGPPOLoss",
    "CISPOLoss",
    "DGPOLoss",
    "GPPOLoss",
    "GRPOLoss",
    "LOSSES",
    "LossOutput",
    "PGLoss",
    "PolicyLoss",
    "REGION_NAMES",
    "aggregate",
    "build_loss",
    "k3_kl",
    "regions",
    "resolve_loss",
]


def resolve_loss(value: PolicyLoss | str | None) -> PolicyLoss:
    """The policy loss of ``model.loss``: a :class:`PolicyLoss`, a built-in name, or ``None``.

    ``None`` gives :class:`DGPOLoss` with its defaults. jsonargparse falls back to the ``str``
    branch of ``PolicyLoss | str`` when a ``class_path`` does not name a :class:`PolicyLoss`
    subclass, so that case arrives here as a string and gets its own error.

    Raises:
        ValueError: for an unknown name, or anything that is not a :class:`PolicyLoss`.
    """
    if value is None:
        return DGPOLoss()
    if isinstance(value, PolicyLoss):
        return value
    if not isinstance(value, str):
        raise ValueError(f"loss must be a dgpo.losses.PolicyLoss or one of {list(LOSSES)}, "
                         f"got {type(value).__name__}")
    if value not in LOSSES and ("class_path" in value or "." in value):
        raise ValueError(
            f"model.loss {value!r} is not a dgpo.losses.PolicyLoss: give the class_path of a "
            f"PolicyLoss subclass (see dgpo.losses) or a built-in name: {', '.join(LOSSES)}")
    return build_loss(value)  # an unknown name raises, listing the known ones
