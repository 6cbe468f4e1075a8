"""Loading the policy and the reference model: on every rank, or read by rank 0 only under FSDP.

Under FSDP on several ranks only rank 0 reads the checkpoint; the other ranks build the model on
the meta device (no memory) and receive rank 0's weights once it is sharded, so a node holds one
full copy in CPU memory instead of one per GPU (see :func:`dgpo.distributed.load_from_rank0`).
"""

from __future__ import annotations

from typing import Any

import torch
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
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if empty:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def wrap_from_rank0(model: Module, device: torch.device, is_rank0: bool) -> Module:
    """Wrap ``model`` in FSDP1 (inside the strategy's ``enable_wrap``) and fill it from rank 0.

    Rank 0 passes its loaded model, the other ranks the same architecture on the meta device
    (:func:`load_causal_lm` with ``empty=True``); a collective call.
    """
    full_state = model.state_dict() if is_rank0 else None
    wrapped = wrap(model, param_init_fn=meta_materializer(device))
    load_from_rank0(wrapped, full_state)
    return wrapped
