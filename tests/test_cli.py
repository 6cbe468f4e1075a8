"""``python -m dgpo fit`` end to end on a tiny random model, with each rollout engine."""

import copy
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from dgpo.cli import main
from dgpo.losses import loss_config
from dgpo.module import RLVRModule
from tests.conftest import requires_vllm

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())

EXPECTED_METRICS = [
    # the tests' dense reward has no notion of correctness: zero_variance, no solve_all/none
    "rollout/reward_mean", "rollout/reward_std", "rollout/zero_variance", "train/policy_loss",
    "train/skipped_steps",
    "rollout/response_length_mean", "rollout/response_length_max", "rollout/truncated_fraction",
    "rollout/sync_logp_diff_max", "rollout/tokens_per_second", "train/entropy",
    "train/region/IN", "train/region/LN", "train/region/LP", "train/region/HN", "train/region/HP",
    "train/ratio/mean", "train/grad_weight/mean", "train/grad_norm", "train/lr",
    "time/generation_seconds", "time/scoring_seconds", "time/train_seconds",
]


def tiny_config(tmp_path: Path, model_path: str, engine: str = "transformers", **changes) -> Path:
    config = copy.deepcopy(TINY)
    config["trainer"]["default_root_dir"] = str(tmp_path)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    config["model"]["model_name_or_path"] = model_path
    rollout = config["rollout"]
    rollout["reward"] = {"class_path": "tests.plugins.DigitFractionReward"}
    rollout["mini_batch_size"] = 4  # several optimiser steps per rollout
    if engine == "vllm":
        config["engine"] = {"class_path": "dgpo.rollout.VLLMEngine",
                             "init_args": {"dtype": "float32", "kv_cache_space_gib": 0.25,
                                           "max_model_len": 256}}
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[leaf] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_dir(tmp_path: Path) -> Path:
    (metrics,) = tmp_path.glob("tiny/version_*/metrics.csv")
    return metrics.parent


def epoch_metrics(tmp_path: Path) -> pd.DataFrame:
    frame = pd.read_csv(run_dir(tmp_path) / "metrics.csv")
    return frame.groupby("epoch").mean()


def initial_weights(model_path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path).state_dict()


@pytest.mark.parametrize("engine", ["transformers", pytest.param("vllm", marks=requires_vllm)])
def test_cli_fit_two_epochs_trains_logs_and_checkpoints(tmp_path, tiny_model_path, engine):
    config = tiny_config(tmp_path, tiny_model_path, engine)
    cli = main(["fit", "--config", str(config)])

    before = initial_weights(tiny_model_path)
    after = cli.model.policy.state_dict()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed, "no parameter changed after two epochs"

    metrics = epoch_metrics(tmp_path)
    assert list(metrics.index) == [0, 1]
    missing = [name for name in EXPECTED_METRICS if name not in metrics.columns]
    assert not missing, f"missing metrics: {missing}"
    for name in EXPECTED_METRICS:
        assert metrics[name].map(math.isfinite).all(), name
    assert (metrics["rollout/sync_logp_diff_max"] < 1e-3).all()
    assert metrics["train/ratio/max"].max() > 1.0, "several steps per rollout move the ratio"

    directory = run_dir(tmp_path)
    assert (directory / "checkpoints" / "last.ckpt").is_file()
    assert (directory / "config.yaml").is_file()
    checkpoint = torch.load(directory / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["epoch"] == 1 and "RLVRDataModule" in checkpoint
    assert "rollout/solve_all" not in metrics.columns
    # the trained loss (class and hyper-parameters) comes back with the checkpoint
    restored = RLVRModule.load_from_checkpoint(directory / "checkpoints" / "last.ckpt")
    assert repr(restored.loss_fn) == repr(cli.model.loss_fn)
    assert loss_config(restored.loss_fn) == {
        "class_path": "dgpo.losses.dgpo.DGPOLoss",
        "init_args": {"clip_low": 0.2, "clip_high": 0.2, "agg": "token-mean",
                      "norm_length": None, "n": 1.0, "m": 2.0}}


def test_cli_trains_a_user_loss_from_class_path(tmp_path, tiny_model_path):
    config = tiny_config(tmp_path, tiny_model_path, **{"trainer.max_epochs": 1})
    cli = main(["fit", "--config", str(config),
                "--model.loss", json.dumps({"class_path": "tests.plugins.SignedLogProbLoss",
                                            "init_args": {"scale": 2.0}})])
    assert type(cli.model.loss_fn).__name__ == "SignedLogProbLoss"
    assert cli.model.loss_fn.scale == 2.0
    metrics = epoch_metrics(tmp_path)
    assert "train/grad_weight/mean" not in metrics.columns  # the loss states no weight
    assert metrics["train/grad_norm"].iloc[0] > 0


@pytest.mark.parametrize("name", ["gppo", "grpo", "cispo"])
def test_cli_loss_config_files_combine_with_a_run_config(tmp_path, tiny_model_path, name):
    config = tiny_config(tmp_path, tiny_model_path, **{"trainer.max_epochs": 1})
    cli = main(["fit", "--config", str(config), "--config",
                str(REPO / "configs" / "losses" / f"{name}.yaml"), "--trainer.max_epochs", "1"])
    assert type(cli.model.loss_fn).__name__.lower().startswith(name)


def test_cli_loss_by_builtin_name(tmp_path, tiny_model_path):
    config = tiny_config(tmp_path, tiny_model_path)
    cli = main(["--config", str(config), "--model.loss", "aspo"], run=False)
    assert type(cli.model.loss_fn).__name__ == "ASPOLoss"


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if any model weights are loaded."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration error was raised")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_cli_missing_data_file_fails_before_loading(tmp_path, tiny_model_path, no_model_loading):
    config = tiny_config(tmp_path, tiny_model_path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        main(["fit", "--config", str(config), "--data.synthetic", "null",
              "--data.train_file", str(tmp_path / "nope.jsonl")])


def test_cli_empty_data_file_fails_before_loading(tmp_path, tiny_model_path, no_model_loading):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config = tiny_config(tmp_path, tiny_model_path)
    with pytest.raises(ValueError, match="empty"):
        main(["fit", "--config", str(config), "--data.synthetic", "null",
              "--data.train_file", str(empty)])


def test_cli_unknown_field_fails_before_loading(tmp_path, tiny_model_path, no_model_loading):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n")
    config = tiny_config(tmp_path, tiny_model_path)
    with pytest.raises(ValueError, match="problem"):
        main(["fit", "--config", str(config), "--data.synthetic", "null",
              "--data.train_file", str(data)])


def test_cli_unknown_loss_name_fails_before_loading(tmp_path, tiny_model_path, no_model_loading):
    config = tiny_config(tmp_path, tiny_model_path)
    with pytest.raises(ValueError, match="unknown loss 'ppo'; known losses: pg, grpo"):
        main(["fit", "--config", str(config), "--model.loss", "ppo"])


def test_cli_indivisible_mini_batch_fails_before_loading(tmp_path, tiny_model_path,
                                                         no_model_loading):
    config = tiny_config(tmp_path, tiny_model_path,
                         **{"rollout.mini_batch_size": 5})
    with pytest.raises(ValueError, match="mini_batch_size=5 must divide the rollout batch"):
        main(["fit", "--config", str(config)])


def test_cli_missing_model_path_fails_before_loading(tmp_path, no_model_loading):
    config = tiny_config(tmp_path, str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        main(["fit", "--config", str(config)])


def test_cli_single_sample_groups_fail_before_loading(tmp_path, tiny_model_path,
                                                      no_model_loading):
    config = tiny_config(tmp_path, tiny_model_path, **{"rollout.n": 1,
                                                      "rollout."
                                                      "mini_batch_size": 4})
    with pytest.raises(ValueError, match="n=1 samples per prompt"):
        main(["fit", "--config", str(config)])


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")))
def test_cli_every_shipped_config_parses(path, capsys):
    if path.parent.name in ("losses", "presets"):  # partial configs, stacked after a task
        args = ["fit", "--config", str(REPO / "configs" / "tiny.yaml"), "--config", str(path)]
    else:
        args = ["fit", "--config", str(path)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code == 0
    assert "model_name_or_path" in capsys.readouterr().out


PAPER_CONFIGS = sorted((REPO / "configs" / "paper").glob("r1-distill-*.yaml"))
LOSS_CONFIGS = sorted((REPO / "configs" / "losses").glob("*.yaml"))


@pytest.mark.parametrize("loss", LOSS_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("paper", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_cli_paper_config_with_every_loss_prints(paper, loss, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(paper), "--config", str(loss), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["lr"] == pytest.approx(4.63e-7)
    assert printed["model"]["loss"]["class_path"].startswith("dgpo.losses.")
    rollout = printed["rollout"]
    assert (rollout["n"], rollout["rollout_batch_size"], rollout["max_new_tokens"]) == (5, 1024,
                                                                                       1024)
    assert rollout["mini_batch_size"] == 256 * 5 and printed["model"]["kl_coef"] == 0.0
    # bf16 compute, fp32 gradient reduction and buffers (RoPE), as in verl
    precision = printed["trainer"]["strategy"]["init_args"]["mixed_precision"]
    assert (precision["param_dtype"], precision["reduce_dtype"], precision["buffer_dtype"]) == (
        "torch.bfloat16", "torch.float32", "torch.float32")


def test_cli_unknown_config_key_is_a_clear_error(tmp_path, tiny_model_path, capsys,
                                                 no_model_loading):
    config = tiny_config(tmp_path, tiny_model_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--model.learning_rate", "1e-3"])
    assert "learning_rate" in capsys.readouterr().err


def test_cli_loss_that_is_not_a_policy_loss_is_a_clear_error(tmp_path, tiny_model_path,
                                                             no_model_loading):
    config = tiny_config(tmp_path, tiny_model_path)
    with pytest.raises(ValueError, match=r"NotALoss.*is not a dgpo.losses.PolicyLoss"):
        main(["fit", "--config", str(config), "--model.loss",
              json.dumps({"class_path": "tests.plugins.NotALoss"})])


def test_first_mini_batch_reuses_its_training_logprobs_as_behaviour_logprobs(
        tmp_path, tiny_model_path, monkeypatch):
    """Deferring π_old of the first mini-batch skips its scoring pass and changes no number."""
    from tests.plugins import ScoringCountModule

    monkeypatch.setattr("dgpo.cli.RLVRModule", ScoringCountModule)
    runs = {}
    for defer in (True, False):
        monkeypatch.setattr(ScoringCountModule, "defer", defer)
        path = tiny_config(tmp_path / str(defer), tiny_model_path, **{"trainer.max_epochs": 2})
        runs[defer] = main(["fit", "--config", str(path)]).model
    # 16 sequences in mini-batches of 4: the first mini-batch of each epoch is not scored
    assert runs[False].scored == [16, 16] and runs[True].scored == [12, 12]
    # the two runs differ by float rounding only (at most 1.3e-5 after 8 Adam steps at lr 1e-3
    # with seed 0: Adam's normalised step amplifies rounding in near-zero gradients), while
    # training moved the weights by about 1e-3
    start = initial_weights(tiny_model_path)
    moved = max(float((p - start[n]).abs().max())
                for n, p in runs[True].policy.state_dict().items())
    assert moved > 1e-3
    for (name, a), b in zip(runs[False].policy.state_dict().items(),
                            runs[True].policy.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-5, msg=name)
    got = epoch_metrics(tmp_path / "True").filter(like="train/")
    expected = epoch_metrics(tmp_path / "False").filter(like="train/")
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=1e-4, atol=1e-5)


def test_an_engine_that_misses_weight_pushes_stops_the_run(tmp_path, tiny_model_path):
    stale = {"class_path": "tests.plugins.StaleEngine",
             "init_args": {"model_path": tiny_model_path, "dtype": "float32"}}
    path = tiny_config(tmp_path, tiny_model_path, **{
        "trainer.max_epochs": 3, "rollout.sync_tolerance": 1e-3})
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "engine": stale}))
    with pytest.raises(RuntimeError, match="disagree after the weight push"):
        main(["fit", "--config", str(path)])
    # the first rollout (identical weights) passed the check and trained
    assert epoch_metrics(tmp_path)["rollout/sync_logp_diff_max"].iloc[0] < 1e-4


def test_scoring_no_samples_leaves_the_policy_in_train_mode(tiny_model_path):
    """With one mini-batch per rollout every π_old is deferred and nothing is scored."""
    from dgpo.module import RLVRModule

    module = RLVRModule(tiny_model_path)
    module.configure_model()
    assert module.policy.training
    assert module.score_samples([]) == []
    assert module.policy.training  # gradient checkpointing and dropout act in train mode only


@pytest.mark.parametrize("samples", [0, 1])
def test_sharded_scoring_makes_as_many_forward_passes_as_the_busiest_rank(tiny_model_path,
                                                                          monkeypatch, samples):
    """Under FSDP a rank with fewer (or no) samples to score pads to the others' micro-batches."""
    from types import SimpleNamespace

    from dgpo.module import RLVRModule
    from dgpo.rollout.buffer import RolloutSample

    module = RLVRModule(tiny_model_path, micro_batch_size=1)
    module.configure_model()
    rows = [RolloutSample(prompt_ids=[5, 6, 7], response_ids=[8, 9], advantage=0.0)][:samples]
    expected = module.score_samples(rows)  # one process: no padding
    busiest = 3  # micro-batches on the busiest rank, as the strategy's max-reduce reports
    monkeypatch.setattr(RLVRModule, "sharded", property(lambda self: True))
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(
        reduce=lambda tensor, reduce_op: torch.tensor(busiest) if reduce_op == "max" else None))
    calls = []
    module.policy.get_decoder().register_forward_hook(lambda *args: calls.append(1))
    got = module.score_samples(rows)
    assert len(calls) == 2 * busiest  # prompt and response passes, every micro-batch
    assert len(got) == samples
    for value, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(value, reference)


def test_cli_bad_loss_hyperparameter_puts_its_reason_on_the_first_line(tmp_path):
    import subprocess
    import sys

    command = [sys.executable, "-m", "dgpo", "fit", "--config", str(REPO / "configs" / "tiny.yaml"),
               "--model.loss.init_args.clip_low", "2.0"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == "dgpo: error: clip_low must be in (0.0, 1.0), got 2.0"
    with pytest.raises(ValueError, match=r"^clip_low must be in \(0.0, 1.0\), got 2.0\n"):
        main(["fit", "--config", str(REPO / "configs" / "tiny.yaml"),
              "--model.loss.init_args.clip_low", "2.0"])
