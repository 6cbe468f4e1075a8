"""LoRA end to end: only adapters train and are saved, exact resume, evaluation, export."""

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from dgpo.cli import main
from dgpo.lora import LORA_MARK
from dgpo.module import RLVRModule
from tests.evaluation.test_evaluation_cli import eval_config
from tests.test_cli import initial_weights, run_dir, tiny_config
from tests.test_resume import comparable

LORA = {"r": 4, "alpha": 8.0}


def _config(tmp_path, model_path, epochs, stop_after=None):
    config = tiny_config(tmp_path, model_path, **{"trainer.max_epochs": epochs,
                                                   "model.lora": LORA, "model.kl_coef": 0.1})
    if stop_after is not None:
        data = yaml.safe_load(config.read_text())
        data["trainer"]["callbacks"].append({"class_path": "tests.plugins.StopAfterEpochs",
                                             "init_args": {"epochs": stop_after}})
        config.write_text(yaml.safe_dump(data))
    return config


def _adapters(module):
    return {n: p.detach().clone() for n, p in module.policy.named_parameters()
            if LORA_MARK in n}


def test_lora_trains_only_adapters_saves_them_and_resumes_exactly(tmp_path, tiny_model_path):
    straight = main(["fit", "--config", str(_config(tmp_path / "a", tiny_model_path, 2))])
    base = initial_weights(tiny_model_path)
    merged = dict(straight.model.named_weights_for_engine())
    assert merged.keys() == base.keys(), "engines receive the base model's names"
    frozen = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
              for n, p in straight.model.policy.state_dict().items() if LORA_MARK not in n}
    for name, tensor in frozen.items():
        torch.testing.assert_close(tensor, base[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(merged[n], base[n]) for n in base), "training moved the policy"

    checkpoint = run_dir(tmp_path / "a") / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert state and all(LORA_MARK in key for key in state), "only the adapters are saved"
    restored = RLVRModule.load_from_checkpoint(checkpoint)
    for name, tensor in _adapters(straight.model).items():
        torch.testing.assert_close(dict(restored.policy.named_parameters())[name], tensor,
                                   rtol=0, atol=0)

    first = main(["fit", "--config", str(_config(tmp_path / "b", tiny_model_path, 2, 1))])
    assert first.trainer.current_epoch == 1
    last = run_dir(tmp_path / "b") / "checkpoints" / "last.ckpt"
    resumed = main(["fit", "--config", str(_config(tmp_path / "b", tiny_model_path, 2)),
                    "--ckpt_path", str(last)])
    for name, tensor in _adapters(straight.model).items():
        torch.testing.assert_close(_adapters(resumed.model)[name], tensor, rtol=0, atol=0)
    got = comparable(next((tmp_path / "b").glob("tiny/version_1/metrics.csv")))
    expected = comparable(run_dir(tmp_path / "a") / "metrics.csv")
    pd_cols = [c for c in got.columns if c.startswith(("train/", "rollout/reward"))]
    torch.testing.assert_close(torch.tensor(got[pd_cols].to_numpy()),
                               torch.tensor(expected.loc[[1], pd_cols].to_numpy()))

    # `dgpo test` evaluates the LoRA checkpoint (the config names the same adapters)
    (tmp_path / "eval").mkdir()
    test_config = eval_config(tmp_path / "eval", tiny_model_path)
    main(["test", "--config", str(test_config), "--model.lora", str(LORA),
          "--ckpt_path", str(checkpoint)])
    assert list((tmp_path / "eval").glob("eval/version_*/results.json"))

    # `dgpo export` writes the merged policy as a Hugging Face folder
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(checkpoint), str(tmp_path / "merged")])
    assert exit_info.value.code == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    for name, tensor in merged.items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=1e-6, msg=name)
