"""Policy losses: PG, GRPO, CISPO, GPPO, CE-GPPO, ASPO, DGPO, SAPO, GSPO and GMPO, one contract.

Build one by name with :func:`build_loss`, or by class (``class_path``/``init_args`` in YAML).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from dgpo.losses.aspo import ASPOLoss
from dgpo.losses.base import (
    AGGREGATIONS,
    REGION_NAMES,
    LossOutput,
    PolicyLoss,
    aggregate,
    regions,
    sequence_mean,
)
from dgpo.losses.ce_gppo import CEGPPOLoss
from dgpo.losses.cispo import CISPOLoss
from dgpo.losses.correction import (
    CORRECTION_MODES,
    check_correction,
    rollout_correction,
    rollout_correction_metrics,
)
from dgpo.losses.dgpo import DGPOLoss
from dgpo.losses.gmpo import GMPOLoss
from dgpo.losses.gppo import GPPOLoss
from dgpo.losses.grpo import GRPOLoss
from dgpo.losses.gspo import GSPOLoss
from dgpo.losses.kl import KL_ESTIMATORS, k3_kl, kl_penalty
from dgpo.losses.pg import PGLoss
from dgpo.losses.sapo import SAPOLoss
from dgpo.losses.sequence import SequencePolicyLoss

#: The built-in losses by name.
LOSSES: dict[str, type[PolicyLoss]] = {
    "pg": PGLoss,
    "grpo": GRPOLoss,
    "cispo": CISPOLoss,
    "gppo": GPPOLoss,
    "ce_gppo": CEGPPOLoss,
    "aspo": ASPOLoss,
    "dgpo": DGPOLoss,
    "sapo": SAPOLoss,
    "gspo": GSPOLoss,
    "gmpo": GMPOLoss,
}


def build_loss(name: str, **hparams: Any) -> PolicyLoss:
    """Build a built-in loss by name with its hyper-parameters.

    Args:
        name: one of ``LOSSES`` (``"pg"``, ``"grpo"``, ``"cispo"``, ``"gppo"``, ``"ce_gppo"``,
            ``"aspo"``, ``"dgpo"``, ``"sapo"``, ``"gspo"``, ``"gmpo"``).
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
    "CORRECTION_MODES",
    "ASPOLoss",
    "CEGPPOLoss",
    "CISPOLoss",
    "DGPOLoss",
    "GMPOLoss",
    "GPPOLoss",
    "GRPOLoss",
    "GSPOLoss",
    "KL_ESTIMATORS",
    "LOSSES",
    "LossOutput",
    "PGLoss",
    "PolicyLoss",
    "REGION_NAMES",
    "SAPOLoss",
    "SequencePolicyLoss",
    "aggregate",
    "build_loss",
    "check_correction",
    "k3_kl",
    "kl_penalty",
    "loss_config",
    "regions",
    "resolve_loss",
    "rollout_correction",
    "rollout_correction_metrics",
    "sequence_mean",
]


def loss_config(loss: PolicyLoss) -> dict[str, Any]:
    """``{"class_path": ..., "init_args": {...}}`` of ``loss``, as in YAML (:func:`resolve_loss`).

    The init args are the constructor parameters that the loss keeps as attributes of the same
    name (every built-in loss does); the checkpoint stores this, so ``load_from_checkpoint``
    rebuilds exactly the trained loss.

    Example:
        >>> loss_config(build_loss("grpo", clip_high=0.28))["init_args"]["clip_high"]
        0.28
    """
    cls = type(loss)
    params = inspect.signature(cls.__init__).parameters
    init_args = {name: getattr(loss, name) for name in params
                 if name != "self" and hasattr(loss, name)}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def _loss_from_config(config: Mapping[str, Any]) -> PolicyLoss:
    """The loss that :func:`loss_config` describes."""
    class_path = config["class_path"]
    module_name, _, class_name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"loss class_path {class_path!r} cannot be imported: {error}") from error
    if not (isinstance(cls, type) and issubclass(cls, PolicyLoss)):
        raise ValueError(f"loss class_path {class_path!r} is not a dgpo.losses.PolicyLoss")
    return cls(**dict(config["init_args"] if "init_args" in config else {}))


def resolve_loss(value: PolicyLoss | str | Mapping[str, Any] | None) -> PolicyLoss:
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
    if isinstance(value, Mapping) and "class_path" in value:  # a checkpoint's loss_config()
        return _loss_from_config(value)
    if not isinstance(value, str):
        raise ValueError(f"loss must be a dgpo.losses.PolicyLoss or one of {list(LOSSES)}, "
                         f"got {type(value).__name__}")
    if value not in LOSSES and ("class_path" in value or "." in value):
        raise ValueError(
            f"model.loss {value!r} is not a dgpo.losses.PolicyLoss: give the class_path of a "
            f"PolicyLoss subclass (see dgpo.losses) or a built-in name: {', '.join(LOSSES)}")
    return build_loss(value)  # an unknown name raises, listing the known ones
