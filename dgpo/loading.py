"""Loading the policy and the reference model: on every rank, or read by rank 0 only under FSDP.

Under FSDP on several ranks only rank 0 reads the checkpoint; the other ranks build the model on
the meta device (no memory) and receive rank 0's weights once it is sharded, so a node holds one
full copy in CPU memory instead of one per GPU (see :func:`dgpo.distributed.load_from_rank0`).

Loading fails naming the culprit: a damaged ``.safetensors`` file of a local model folder, or a
weight tensor holding NaN or infinite values (which would turn every update into NaN).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch.distributed.fsdp.wrap import wrap
from torch.nn import Module

from dgpo.distributed import load_from_rank0, meta_materializer

#: The dtypes a config may name for weights or mixed-precision compute.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(path: str, dtype: torch.dtype, attn_implementation: str | None = None,
                   empty: bool = False) -> Module:
    """A Hugging Face causal LM from ``path``, or (``empty``) its architecture on the meta device.

    Args:
        path: a local folder or a hub id.
        dtype: the weights' dtype.
        attn_implementation: passed to ``from_pretrained`` (``"sdpa"``, ...); None: the default.
        empty: build the model from its config on the meta device without reading any weights.

    Raises:
        ValueError: if a ``.safetensors`` file of a local folder is damaged (naming the file), or
            a loaded weight is not finite (naming the tensor).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if empty:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), **kwargs)
    if Path(path).is_dir():
        check_safetensors(Path(path))
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    check_finite_weights(model, path)
    return model


def check_safetensors(folder: Path) -> None:
    """Read the header of every ``*.safetensors`` file in ``folder`` (cheap: no tensor data).

    Raises:
        ValueError: naming the first file whose header is damaged or that is truncated.
    """
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ValueError(f"damaged weights file {str(file)!r}: {error}; rebuild or "
                             "re-download the model folder") from error


#: Elements checked at once by :func:`check_finite_weights` (bounds its extra memory).
_FINITE_CHUNK = 1 << 24


def check_finite_weights(model: Module, source: str) -> None:
    """Raise if a floating-point parameter or buffer of ``model`` holds NaN or infinity.

    One pass over the weights, in chunks of ``2**24`` elements so the check's memory stays small.

    Raises:
        ValueError: naming the first non-finite tensor, its NaN and infinite counts and ``source``.
    """
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        flat = tensor.detach().reshape(-1)
        if all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(_FINITE_CHUNK)):
            continue
        nans = int(torch.isnan(flat).sum())
        infs = int(torch.isinf(flat).sum())
        raise ValueError(f"non-finite weights in {name} of {source!r}: {nans} NaN and {infs} "
                         f"infinite values among {flat.numel()}; the model folder is damaged or "
                         "was saved from a diverged run")


def wrap_from_rank0(model: Module, device: torch.device, is_rank0: bool) -> Module:
    """Wrap ``model`` in FSDP1 (inside the strategy's ``enable_wrap``) and fill it from rank 0.

    Rank 0 passes its loaded model, the other ranks the same architecture on the meta device
    (:func:`load_causal_lm` with ``empty=True``); a collective call.
    """
    full_state = model.state_dict() if is_rank0 else None
    wrapped = wrap(model, param_init_fn=meta_materializer(device))
    load_from_rank0(wrapped, full_state)
    return wrapped
