"""Loading the policy fails naming the damaged file or the non-finite tensor."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dgpo.loading import check_finite_weights, load_causal_lm


def _copy(tiny_model_path: str, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_path, folder)
    return folder


def test_load_causal_lm_truncated_safetensors_names_the_file(
    tiny_model_path: str, tmp_path: Path
) -> None:
    folder = _copy(tiny_model_path, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) * 9 // 10])  # an interrupted download
    with pytest.raises(ValueError, match=r"^damaged weights file '.*model/model\.safetensors'"):
        load_causal_lm(str(folder), torch.float32)


def test_load_causal_lm_garbage_safetensors_names_the_file(
    tiny_model_path: str, tmp_path: Path
) -> None:
    folder = _copy(tiny_model_path, tmp_path)
    (folder / "model.safetensors").write_text("<html>rate limited</html>")
    with pytest.raises(ValueError, match=r"^damaged weights file '.*model\.safetensors'"):
        load_causal_lm(str(folder), torch.float32)


def test_load_causal_lm_nan_weight_names_the_tensor(tiny_model_path: str, tmp_path: Path) -> None:
    folder = _copy(tiny_model_path, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, :2] = float("nan")
    tensors[name][4, 0] = float("inf")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    numel = tensors[name].numel()
    with pytest.raises(ValueError, match=rf"^non-finite weights in {name} of '.*model': 2 NaN "
                                         rf"and 1 infinite values among {numel}"):
        load_causal_lm(str(folder), torch.float32)


def test_load_causal_lm_healthy_model_loads(tiny_model_path: str) -> None:
    model = load_causal_lm(tiny_model_path, torch.float32)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_check_finite_weights_checks_buffers_and_every_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("dgpo.loading._FINITE_CHUNK", 4)  # the bad value is in the last chunk
    module = torch.nn.BatchNorm1d(10)
    check_finite_weights(module, "ok")
    module.running_var[9] = float("inf")
    with pytest.raises(ValueError, match="non-finite weights in running_var of 'bn': 0 NaN and 1"):
        check_finite_weights(module, "bn")
    module.running_var[9] = 1.0
    module.num_batches_tracked.fill_(7)  # integer buffers are skipped
    check_finite_weights(module, "ok")
