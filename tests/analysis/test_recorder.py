"""The gradient-weight recorder: its file, its bound, its weights, and no effect on training."""

import copy
import json
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from dgpo.analysis import COLUMNS, GradientWeightRecorder, load_run
from dgpo.analysis.recorder import METHOD_PREFIX
from dgpo.analysis.weights import TOKEN_LEVEL_METHODS
from dgpo.cli import main
from dgpo.losses import REGION_NAMES, DGPOLoss, GPPOLoss, GSPOLoss, build_loss, regions
from tests.analysis.conftest import fake_outputs, feed
from tests.plugins import SignedLogProbLoss
from tests.test_cli import TINY

EXPECTED = [*COLUMNS, *(METHOD_PREFIX + name for name in TOKEN_LEVEL_METHODS)]


def test_recorder_file_has_the_documented_columns_and_metadata(tmp_path):
    recorder = GradientWeightRecorder(tokens_per_step=16, max_rows=1000)
    feed(recorder, tmp_path, steps=8)
    table = pq.read_table(tmp_path / "gradient_weights.parquet")
    assert table.column_names == EXPECTED
    meta = json.loads(table.schema.metadata[b"dgpo"])
    assert meta == json.loads((tmp_path / "gradient_weights.json").read_text())
    assert set(meta["columns"]) == set(EXPECTED)
    assert meta["method"] == "dgpo" and meta["loss"]["init_args"]["n"] == 1.0
    assert meta["rows"] == table.num_rows == 8 * 16 and meta["steps"] == 8
    assert meta["finished"] is True
    run = load_run(tmp_path)
    assert list(run.tokens["region"].cat.categories) == list(REGION_NAMES)
    assert run.method == "dgpo" and run.methods == list(TOKEN_LEVEL_METHODS)


def test_recorder_weights_equal_prob_weight_recomputed_from_the_recorded_tokens(tmp_path):
    loss = GPPOLoss(clip_low=0.25, clip_high=0.3)
    feed(GradientWeightRecorder(tokens_per_step=32), tmp_path, steps=6, loss=loss)
    tokens = load_run(tmp_path).tokens
    ratio, old_prob, advantage = (torch.tensor(tokens[c].to_numpy())
                                  for c in ("ratio", "old_prob", "advantage"))
    assert (tokens["region"] != "IN").mean() > 0.2, "the fake tokens should leave the region"
    np.testing.assert_array_equal(tokens["prob_weight"],
                                  loss.prob_weight(ratio, old_prob, advantage).numpy())
    np.testing.assert_array_equal(tokens["w_gppo"], tokens["prob_weight"])
    for name in TOKEN_LEVEL_METHODS:  # every token-level method with the trained loss's widths
        other = build_loss(name, clip_low=0.25, clip_high=0.3) if name != "gppo" else loss
        # float32 exp/sigmoid (SAPO) may differ in the last bit between a vectorised kernel on
        # the step's tokens and one on the whole file: equal to float32 rounding, not bitwise
        np.testing.assert_allclose(tokens[f"w_{name}"],
                                   other.prob_weight(ratio, old_prob, advantage).numpy(),
                                   rtol=1e-6, atol=0)
    np.testing.assert_allclose(tokens["grad_weight"], tokens["prob_weight"] * tokens["prob"],
                               rtol=1e-6)
    codes = regions(ratio, advantage, 0.25, 0.3).numpy()
    assert list(tokens["region"].astype(str)) == [REGION_NAMES[c] for c in codes]


def test_recorder_matches_the_tokens_it_was_given(tmp_path):
    outputs = feed(GradientWeightRecorder(tokens_per_step=10_000), tmp_path, steps=2,
                   steps_per_epoch=2)
    tokens = load_run(tmp_path).tokens
    first = tokens[tokens["step"] == 0]
    mask = outputs[0]["mask"]
    assert len(first) == int(mask.sum())  # fewer valid tokens than tokens_per_step: all of them
    rows, cols = first["sequence"].to_numpy().copy(), first["position"].to_numpy().copy()
    assert mask[rows, cols].all()
    for column, key in (("ratio", "ratio"), ("old_logp", "old_logp"), ("logp", "logp"),
                        ("advantage", "advantages"), ("prob_weight", "prob_weight")):
        np.testing.assert_array_equal(first[column], outputs[0][key][rows, cols].numpy())


def test_recorder_size_respects_the_bound(tmp_path):
    recorder = GradientWeightRecorder(tokens_per_step=8, max_rows=50)
    feed(recorder, tmp_path, steps=40)
    run = load_run(tmp_path)
    assert len(run.tokens) == 50
    assert run.meta["tokens_drawn"] == 40 * 8 and run.meta["max_rows"] == 50
    assert run.tokens.groupby("step").size().max() <= 8
    assert run.tokens["step"].nunique() > 20, "the kept rows span the whole run"
    assert run.tokens["step"].is_monotonic_increasing


def test_recorder_states_no_weight_for_a_loss_without_one(tmp_path):
    recorder = GradientWeightRecorder(tokens_per_step=4, methods=["grpo", "dgpo"])
    module = SimpleNamespace(loss_fn=SignedLogProbLoss(), hparams={})
    trainer = SimpleNamespace(is_global_zero=True, global_step=1, current_epoch=0,
                              log_dir=str(tmp_path), default_root_dir=str(tmp_path))
    recorder.setup(trainer, module, "fit")
    outputs = fake_outputs(0) | {"prob_weight": None}  # what the module returns for such a loss
    recorder.on_train_batch_end(trainer, module, outputs, None, 0)
    recorder.on_train_end(trainer, module)
    run = load_run(tmp_path)
    assert run.tokens["prob_weight"].isna().all() and run.methods == ["grpo", "dgpo"]
    assert run.method == "signedlogprobloss"


def test_recorder_leaves_the_global_random_state_alone(tmp_path):
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()
    feed(GradientWeightRecorder(tokens_per_step=8, max_rows=20), tmp_path, steps=10)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state,
                                                    strict=True))


def test_recorder_needs_a_policy_loss(tmp_path):
    recorder = GradientWeightRecorder()
    with pytest.raises(ValueError, match="needs a module whose `loss_fn` is a"):
        recorder.setup(SimpleNamespace(), SimpleNamespace(loss_fn=None), "fit")


def test_recorder_rejects_bad_settings():
    with pytest.raises(ValueError, match="tokens_per_step must be an integer >= 1"):
        GradientWeightRecorder(tokens_per_step=0)
    with pytest.raises(ValueError, match="max_rows must be an integer >= 1"):
        GradientWeightRecorder(max_rows=-1)
    with pytest.raises(ValueError, match="unknown methods \\['ppo'\\]"):
        GradientWeightRecorder(methods=["ppo"])
    with pytest.raises(ValueError, match="must end with '.parquet'"):
        GradientWeightRecorder(filename="weights.csv")


def _fit(tmp_path, model_path, recorder):
    config = copy.deepcopy(TINY)
    config["trainer"].update(default_root_dir=str(tmp_path), max_epochs=1,
                             enable_checkpointing=False)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    config["rollout"].update(reward={"class_path": "dgpo.rewards.toy.DigitFractionReward"},
                             mini_batch_size=4)
    config["trainer"]["callbacks"] = []
    if recorder:
        config["trainer"]["callbacks"].append(
            {"class_path": "dgpo.analysis.GradientWeightRecorder",
             "init_args": {"tokens_per_step": 24, "max_rows": 60}})
    config["model"]["model_name_or_path"] = model_path
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return main(["fit", "--config", str(path)])


def test_recorder_in_a_real_run_has_no_effect_on_training(tmp_path, tiny_model_path):
    recorded = _fit(tmp_path / "with", tiny_model_path, recorder=True)
    plain = _fit(tmp_path / "without", tiny_model_path, recorder=False)
    before = recorded.model.policy.state_dict()
    after = plain.model.policy.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)

    (folder,) = (tmp_path / "with").glob("tiny/version_*")
    assert (folder / "config.yaml").is_file() and (folder / "metrics.csv").is_file()
    run = load_run(folder)
    assert run.meta["config"] == "config.yaml" and run.meta["steps"] == 4
    assert len(run.tokens) == 60 and run.meta["tokens_drawn"] == 4 * 24
    tokens = run.tokens
    ratio, old_prob, advantage = (torch.tensor(tokens[c].to_numpy())
                                  for c in ("ratio", "old_prob", "advantage"))
    np.testing.assert_array_equal(tokens["prob_weight"],
                                  DGPOLoss().prob_weight(ratio, old_prob, advantage).numpy())
    assert (tokens.loc[tokens["batch_idx"] == 0, "ratio"] == 1.0).all()  # π_old is the policy
    assert (tokens["ratio"] != 1.0).any(), "later mini-batches move the ratio"


def test_recorder_of_a_sequence_level_loss_records_its_regions_and_weights(tmp_path):
    """GSPO: the region is that of the response's ratio; the weight is the one the loss applied."""
    loss = GSPOLoss(clip_low=0.05, clip_high=0.05)
    outputs = feed(GradientWeightRecorder(tokens_per_step=64), tmp_path, steps=3, loss=loss)
    run = load_run(tmp_path)
    assert run.method == "gspo" and run.methods == list(TOKEN_LEVEL_METHODS)
    tokens = run.tokens
    for step, out in enumerate(outputs):
        mask = out["mask"]
        log_ratio = torch.where(mask, out["ratio"], torch.ones_like(out["ratio"])).log()
        sequence_ratio = torch.exp(log_ratio.sum(-1) / mask.sum(-1).clamp(min=1))
        rows = tokens[tokens["step"] == step]
        seq = torch.tensor(rows["sequence"].to_numpy(), dtype=torch.long)
        pos = torch.tensor(rows["position"].to_numpy(), dtype=torch.long)
        s, advantage = sequence_ratio[seq], out["advantages"][seq, pos]
        expected = np.where(s < 0.95, np.where(advantage < 0, "LN", "LP"),
                            np.where(s > 1.05, np.where(advantage < 0, "HN", "HP"), "IN"))
        assert list(rows["region"].astype(str)) == list(expected)
        np.testing.assert_array_equal(rows["prob_weight"], out["prob_weight"][seq, pos].numpy())
    assert set(tokens["region"].astype(str)) - {"IN"}, "the fake responses should leave the region"
