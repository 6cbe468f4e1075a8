"""LoRA with peft: adapters on the policy, merged weights for the engine, the free reference model.

- :class:`LoraSettings` are the ``model.lora`` hyper-parameters (peft's ``LoraConfig`` fields);
  :func:`apply_lora` puts the adapters on a Hugging Face causal LM and freezes everything else.
- :func:`engine_weights` streams the weights a rollout engine loads, under the *base* model's
  Hugging Face names, each adapted weight merged on the fly as ``W + scale · B @ A`` (computed in
  float32, rounded once to ``W``'s dtype); the policy itself is never modified. It accepts the
  stream of :func:`dgpo.distributed.full_weights`, so it works under FSDP too.
- :func:`adapters_disabled` turns the adapters off for a block: the base model, i.e. the KL
  reference, without a second copy of the weights.
- :func:`drop_frozen_base_weights` / :func:`allow_missing_base_weights` keep checkpoints to the
  adapters; :func:`export_merged` turns such a checkpoint into a merged Hugging Face folder.

Example:
    >>> policy = apply_lora(AutoModelForCausalLM.from_pretrained(path), LoraSettings(r=16))
    >>> engine.load_weights(engine_weights(policy))  # the base model's names, merged values
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import Tensor
from torch.nn import Module
from transformers import AutoTokenizer

from dgpo.distributed import clean_name
from dgpo.loading import DTYPES, load_causal_lm
from dgpo.models import resolve_model
from dgpo.settings import check_known_keys

#: The prefix peft puts before the base model's own parameter names.
PEFT_PREFIX = "base_model.model."
#: Parameter names of LoRA adapters contain this (``....q_proj.lora_A.default.weight``).
LORA_MARK = ".lora_"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters for the policy (``model.lora``); ``None`` there means full fine-tuning.

    Args:
        r: rank of the adapters (>= 1).
        alpha: scaling numerator: the update is ``alpha / r · B @ A``.
        dropout: dropout on the adapters' input, in [0, 1). Non-zero dropout makes train- and
            eval-mode passes differ (the behaviour log-probs can then not be deferred).
        target_modules: module names to adapt (``["q_proj", "v_proj"]``), or ``"all-linear"``
            (every linear layer but the LM head).

    Raises:
        ValueError: for a value out of range.

    Example:
        >>> LoraSettings(r=16, alpha=32).to_peft().lora_alpha
        32
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora.r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not self.alpha > 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            ok = bool(targets.strip())
        else:
            ok = bool(targets) and all(isinstance(t, str) and t.strip() for t in targets)
        if not ok:
            raise ValueError(f"lora.target_modules must be 'all-linear' or a non-empty list of "
                             f"module names, got {targets!r}")

    @classmethod
    def build(cls, value: LoraSettings | Mapping[str, Any] | None) -> LoraSettings | None:
        """``value`` as settings; accepts a dict of fields (saved hyper-parameters) or None.

        Raises:
            ValueError: on an unknown field.
        """
        if value is None or isinstance(value, cls):
            return value
        check_known_keys(cls, value, "lora")
        values = dict(value)
        if isinstance(values.get("target_modules"), tuple):
            values["target_modules"] = list(values["target_modules"])
        return cls(**values)

    def to_peft(self) -> LoraConfig:
        """The equivalent peft ``LoraConfig`` (no bias training, causal LM task)."""
        targets = self.target_modules
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=targets if isinstance(targets, str) else list(targets),
                          bias="none", task_type="CAUSAL_LM")


def apply_lora(model: Module, settings: LoraSettings) -> PeftModel:
    """Put LoRA adapters on ``model``; only the adapters require gradients afterwards.

    The adapters take the dtype of the layers they adapt (uniform dtypes, as FSDP1's flat
    parameters need). ``model`` is modified in place and wrapped: the returned ``PeftModel``
    forwards ``get_decoder``, ``config`` and ``generate`` to it.

    Args:
        model: a Hugging Face causal LM.
        settings: the adapters.

    Returns:
        The ``PeftModel``; its decoder layers are still ``model``'s.

    Raises:
        ValueError: when ``target_modules`` matches no layer, or a non-linear one.
    """
    try:
        peft_model = get_peft_model(model, settings.to_peft(), autocast_adapter_dtype=False)
    except ValueError as error:
        raise ValueError(f"lora.target_modules {settings.target_modules!r} does not fit "
                         f"{type(model).__name__}: {error}") from error
    others = sorted({type(m).__name__ for m in peft_model.modules()
                     if isinstance(m, LoraLayer) and not isinstance(m, LoraLinear)})
    if others:
        raise ValueError(f"lora.target_modules {settings.target_modules!r} selects {others} "
                         "layers; only linear layers are supported")
    return peft_model


def find_peft_model(model: Module) -> PeftModel | None:
    """The ``PeftModel`` in ``model`` (itself, or inside an FSDP1 wrapper), or None."""
    return next((m for m in model.modules() if isinstance(m, PeftModel)), None)


def lora_scalings(model: Module) -> dict[str, float]:
    """``{clean module name: alpha / r}`` of every adapted layer of ``model``'s active adapter."""
    peft_model = _require_peft(model)
    adapter = peft_model.active_adapter
    return {clean_name(name): float(module.scaling[adapter])
            for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def merge_lora_weights(named: Iterable[tuple[str, Tensor]], scalings: Mapping[str, float],
                       adapter: str = "default") -> Iterator[tuple[str, Tensor]]:
    """Turn a peft model's full state-dict stream into the merged base model's, tensor by tensor.

    ``....q_proj.base_layer.weight`` with its ``lora_A``/``lora_B`` becomes ``....q_proj.weight``
    = ``W + scale · B @ A`` (float32 arithmetic, rounded once to ``W``'s dtype), yielded once the
    three have arrived; other tensors are renamed (peft's prefix and ``base_layer.`` removed) and
    passed through. At most one layer's three tensors are buffered at a time when they arrive
    together, as :func:`dgpo.distributed.full_weights` yields them.

    Args:
        named: ``(name, full tensor)`` pairs with the names of the peft model's state dict
            (wrapper parts already removed).
        scalings: :func:`lora_scalings` of the model.
        adapter: the adapter whose update is merged.

    Raises:
        RuntimeError: when an adapted layer's weight or adapters never arrive.
    """
    pending: dict[str, dict[str, Tensor]] = {}
    parts = {".base_layer.weight": "weight", f".lora_A.{adapter}.weight": "A",
             f".lora_B.{adapter}.weight": "B"}
    for name, tensor in named:
        if name.startswith(PEFT_PREFIX):
            name = name[len(PEFT_PREFIX):]
        suffix = next((s for s in parts if name.endswith(s)), None)
        owner = f"{PEFT_PREFIX}{name[:-len(suffix)]}" if suffix else ""
        if suffix is None or owner not in scalings:
            if LORA_MARK not in name:
                yield name.replace(".base_layer.", "."), tensor
            continue
        got = pending.setdefault(owner, {})
        got[parts[suffix]] = tensor
        if len(got) == 3:
            del pending[owner]
            weight = got["weight"]
            delta = (got["B"].float() @ got["A"].float()).mul_(scalings[owner])
            yield f"{owner[len(PEFT_PREFIX):]}.weight", (weight.float() + delta).to(weight.dtype)
    if pending:
        raise RuntimeError(f"adapted layers {sorted(pending)[:3]} ({len(pending)} in all) are "
                           "missing their weight or adapters in the stream")


def engine_weights(model: Module, named: Iterable[tuple[str, Tensor]] | None = None
                   ) -> Iterator[tuple[str, Tensor]]:
    """The merged weights a rollout engine loads, under the base model's Hugging Face names.

    Args:
        model: the LoRA policy (a ``PeftModel``, possibly FSDP-wrapped).
        named: its full weights by state-dict name; default ``model.state_dict()`` (unsharded
            models). Under FSDP pass ``dgpo.distributed.full_weights(model)`` (a collective that
            every rank consumes).

    Yields:
        ``(hf_name, tensor)``: the same names and values as the merged model's ``state_dict()``.
    """
    if named is None:
        named = ((clean_name(k), v.detach()) for k, v in model.state_dict().items())
    yield from merge_lora_weights(named, lora_scalings(model), _require_peft(model).active_adapter)


def adapter_state_dict(model: Module) -> dict[str, Tensor]:
    """The adapters only, under peft's saved names (``...q_proj.lora_A.weight``); unsharded."""
    return get_peft_model_state_dict(_require_peft(model))


@contextlib.contextmanager
def adapters_disabled(model: Module) -> Iterator[None]:
    """Run the block with the adapters off: ``model`` computes as its base model (the reference).

    Uses peft's ``disable_adapter()``, which also drops the adapters' ``requires_grad`` for the
    block and restores it afterwards; use it under ``torch.no_grad()`` (reference scoring).

    Raises:
        ValueError: when ``model`` has no LoRA adapters.
    """
    with _require_peft(model).disable_adapter():
        yield


def drop_frozen_base_weights(module: Module, state_dict: dict[str, Any], prefix: str,
                             local_metadata: dict[str, Any]) -> None:
    """A ``state_dict`` post-hook: keep only the adapters of the ``policy.`` child.

    For a LoRA policy the base weights never change and reload from the model path, so
    checkpoints hold the adapters (and the optimiser state) only.
    """
    start = f"{prefix}policy."
    for key in [k for k in state_dict if k.startswith(start) and LORA_MARK not in k]:
        del state_dict[key]


def allow_missing_base_weights(module: Module, incompatible_keys: Any) -> None:
    """A ``load_state_dict`` post-hook: the LoRA policy's frozen base weights may be missing."""
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not (k.startswith("policy.") and LORA_MARK not in k)]


def export_merged(checkpoint_path: str | Path, out_dir: str | Path) -> Path:
    """Write the policy of a dgpo checkpoint as a merged Hugging Face folder (with tokenizer).

    The checkpoint's hyper-parameters name the base model (``model_name_or_path``), its
    ``dtype`` and ``lora`` (``None``: a full fine-tuning checkpoint, whose policy weights are
    saved as they are); the ``policy.`` entries of its state dict are loaded on top.

    Args:
        checkpoint_path: a Lightning checkpoint file (``last.ckpt``).
        out_dir: the folder to write (created).

    Returns:
        ``out_dir`` as a path.

    Raises:
        ValueError: for a checkpoint folder (sharded FSDP2 checkpoint) or one without policy
            weights, or weights that do not fit the base model.
    """
    path = Path(checkpoint_path)
    if path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is a folder (a sharded checkpoint); export "
                         "needs a single checkpoint file (save_distributed_checkpoint: false)")
    # dgpo's own checkpoint: it also holds RNG states (numpy), which weights_only refuses
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    hparams = checkpoint["hyper_parameters"]
    state = {clean_name(k)[len("policy."):]: v for k, v in checkpoint["state_dict"].items()
             if k.startswith("policy.")}
    if not state:
        raise ValueError(f"checkpoint {str(path)!r} holds no policy weights")
    model_path = resolve_model(hparams["model_name_or_path"])
    model: Module = load_causal_lm(model_path, DTYPES[hparams["dtype"]])
    # checkpoints from before LoRA have no "lora" hyper-parameter: full fine-tuning
    settings = LoraSettings.build(hparams["lora"]) if "lora" in hparams else None
    if settings is not None:
        model = apply_lora(model, settings)
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if settings is None or LORA_MARK in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint {str(path)!r} does not fit {model_path!r}: missing "
                         f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    out = Path(out_dir)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)
    return out


def _require_peft(model: Module) -> PeftModel:
    peft_model = find_peft_model(model)
    if peft_model is None:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters (apply_lora first)")
    return peft_model
