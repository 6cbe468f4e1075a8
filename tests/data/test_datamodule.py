import io
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset
from transformers import PreTrainedTokenizerFast

from dgpo.data import PromptSample, RLVRDataModule
from dgpo.rollout.buffer import RolloutBuffer
from tests.data.conftest import SHARED_DATA

WORDS = ["What", "is", "step", "by", "and"]


def make_datamodule(tokenizer: Any, num_problems: int = 10, **kwargs: Any) -> RLVRDataModule:
    dm = RLVRDataModule(synthetic={"num_problems": num_problems}, **kwargs)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    return dm


def ids(samples: list[PromptSample]) -> list[str]:
    return [sample.columns["id"] for sample in samples]


def test_rlvr_datamodule_needs_exactly_one_source(write_jsonl: Callable[..., Path]) -> None:
    with pytest.raises(ValueError, match="exactly one of train_file and synthetic"):
        RLVRDataModule()
    with pytest.raises(ValueError, match="exactly one of train_file and synthetic"):
        RLVRDataModule(train_file=str(write_jsonl([{"problem": "a", "answer": "1"}])), synthetic={})


def test_rlvr_datamodule_bad_file_fails_in_init(
    tmp_path: Path, write_jsonl: Callable[..., Path]
) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        RLVRDataModule(train_file=str(tmp_path / "nope.jsonl"))
    path = str(write_jsonl([{"question": "a", "answer": "1"}]))
    with pytest.raises(ValueError, match=r"'problem' is not in .*\['answer', 'question'\]"):
        RLVRDataModule(train_file=path)
    rows = RLVRDataModule(train_file=path, problem_field="question").rows
    assert rows == [{"question": "a", "answer": "1", "problem": "a"}]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"on_long_prompt": "truncate"},
            r"on_long_prompt must be one of \['filter', 'error'\], got 'truncate'",
        ),
        ({"max_prompt_length": 0}, "max_prompt_length must be an int >= 1, got 0"),
        ({"template": "no field"}, "must contain the field {problem}"),
        ({"synthetic": {"num_problem": 3}}, r"unknown synthetic task settings \['num_problem'\]"),
        ({"synthetic": {"operations": ["%"]}}, "unknown operation '%'"),
    ],
)
def test_rlvr_datamodule_bad_args(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RLVRDataModule(**{"synthetic": {"num_problems": 4}, **kwargs})


def test_rlvr_datamodule_hparams_are_checkpoint_safe() -> None:
    dm = RLVRDataModule(synthetic={"num_problems": 4, "operations": ["+", "*"]}, seed=7)
    assert dm.hparams["seed"] == 7
    assert dm.hparams["synthetic"]["operations"] == ("+", "*")
    buffer = io.BytesIO()
    torch.save({"hparams": dict(dm.hparams), "state": dm.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # how Lightning loads checkpoints
    assert loaded["hparams"] == dict(dm.hparams)


def test_rlvr_datamodule_chat_template_has_one_bos(tokenizer: PreTrainedTokenizerFast) -> None:
    dm = make_datamodule(tokenizer, template="{problem}")
    sample = dm.prompts[0]
    assert sample.text == f"<s><|user|>\n{sample.columns['problem']}\n<|assistant|>\n"
    assert sample.prompt_ids == tokenizer(sample.text, add_special_tokens=False)["input_ids"]
    assert sample.prompt_ids.count(tokenizer.bos_token_id) == 1
    assert sample.prompt_ids[0] == tokenizer.bos_token_id


def test_rlvr_datamodule_plain_template_adds_bos_once(
    plain_tokenizer: PreTrainedTokenizerFast,
) -> None:
    dm = make_datamodule(plain_tokenizer, template="{problem}", use_chat_template=False)
    sample = dm.prompts[0]
    assert sample.text == sample.columns["problem"]
    assert sample.prompt_ids[0] == plain_tokenizer.bos_token_id
    assert sample.prompt_ids.count(plain_tokenizer.bos_token_id) == 1
    assert sample.answer == sample.columns["answer"]


def test_rlvr_datamodule_tokenizer_is_handed_over_explicitly(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    dm = RLVRDataModule(synthetic={"num_problems": 3}, tokenizer=tokenizer)
    dm.setup("fit")
    assert len(dm.prompts) == 3
    # never taken from the trainer's module: without a hand-off, setup says how to give one
    dm = RLVRDataModule(synthetic={"num_problems": 3})
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tokenizer))  # type: ignore[assignment]  # stub trainer
    with pytest.raises(RuntimeError, match="needs the policy's tokenizer: pass tokenizer="):
        dm.setup("fit")


def test_rlvr_datamodule_missing_tokenizer_or_chat_template(
    plain_tokenizer: PreTrainedTokenizerFast,
) -> None:
    dm = RLVRDataModule(synthetic={"num_problems": 3})
    with pytest.raises(RuntimeError, match="needs the policy.s tokenizer"):
        dm.setup("fit")
    dm.tokenizer = plain_tokenizer
    with pytest.raises(ValueError, match="has no chat template"):
        dm.setup("fit")


def test_rlvr_datamodule_prompts_only_for_fit(tokenizer: PreTrainedTokenizerFast) -> None:
    dm = RLVRDataModule(synthetic={"num_problems": 3})
    dm.tokenizer = tokenizer
    dm.setup("validate")
    with pytest.raises(RuntimeError, match=r"call setup\('fit'\) first"):
        dm.next_prompts(1)


def long_prompt_datamodule(
    write_jsonl: Callable[..., Path], tokenizer: Any, **kwargs: Any
) -> RLVRDataModule:
    # problems of 1..5 words: 2..6 tokens with BOS
    rows = [{"id": str(n), "problem": " ".join(WORDS[:n]), "answer": "1"} for n in range(1, 6)]
    dm = RLVRDataModule(
        train_file=str(write_jsonl(rows)), template="{problem}", use_chat_template=False, **kwargs
    )
    dm.tokenizer = tokenizer
    return dm


def test_rlvr_datamodule_filters_long_prompts(
    write_jsonl: Callable[..., Path], plain_tokenizer: PreTrainedTokenizerFast
) -> None:
    dm = long_prompt_datamodule(write_jsonl, plain_tokenizer, max_prompt_length=3)
    with pytest.warns(UserWarning, match=r"filtered 3 of 5 prompts .* \(the longest has 6\)"):
        dm.setup("fit")
    assert dm.num_filtered == 3
    assert ids(dm.prompts) == ["1", "2"]
    assert all(len(p.prompt_ids) <= 3 for p in dm.prompts)


def test_rlvr_datamodule_long_prompts_error(
    write_jsonl: Callable[..., Path], plain_tokenizer: PreTrainedTokenizerFast
) -> None:
    dm = long_prompt_datamodule(
        write_jsonl, plain_tokenizer, max_prompt_length=5, on_long_prompt="error"
    )
    with pytest.raises(
        ValueError, match=r"1 of 5 prompts are longer than max_prompt_length=5 .*longest has 6"
    ):
        dm.setup("fit")
    dm = long_prompt_datamodule(write_jsonl, plain_tokenizer, max_prompt_length=1)
    with pytest.raises(ValueError, match="all 5 prompts are longer than max_prompt_length=1"):
        dm.setup("fit")


def test_rlvr_datamodule_next_prompts_exact_k_and_wrap(tokenizer: PreTrainedTokenizerFast) -> None:
    dm = make_datamodule(tokenizer, num_problems=10)
    draws = [dm.next_prompts(k) for k in (3, 3, 3, 3, 25)]
    assert [len(d) for d in draws] == [3, 3, 3, 3, 25]
    flat = [i for draw in draws for i in ids(draw)]
    passes = [flat[i : i + 10] for i in range(0, 30, 10)]
    for one_pass in passes:  # every prompt exactly once per pass
        assert sorted(one_pass) == sorted(ids(dm.prompts))
    assert passes[0] != passes[1]  # reshuffled between passes
    assert max(Counter(flat[30:]).values()) == 1  # the fourth pass has begun, without repeats


def test_rlvr_datamodule_next_prompts_seeded(tokenizer: PreTrainedTokenizerFast) -> None:
    first = ids(make_datamodule(tokenizer, seed=1).next_prompts(25))
    assert first == ids(make_datamodule(tokenizer, seed=1).next_prompts(25))
    assert first != ids(make_datamodule(tokenizer, seed=2).next_prompts(25))


def test_rlvr_datamodule_next_prompts_bad_k(tokenizer: PreTrainedTokenizerFast) -> None:
    dm = make_datamodule(tokenizer)
    for k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k must be an int >= 1"):
            dm.next_prompts(k)  # type: ignore[arg-type]  # bad on purpose


def test_rlvr_datamodule_state_dict_round_trip(tokenizer: PreTrainedTokenizerFast) -> None:
    sizes = [3, 7, 4, 11, 1, 9]
    reference = make_datamodule(tokenizer, seed=5)
    expected = [ids(reference.next_prompts(k)) for k in sizes]

    interrupted = make_datamodule(tokenizer, seed=5)
    assert [ids(interrupted.next_prompts(k)) for k in sizes[:3]] == expected[:3]
    state = interrupted.state_dict()
    assert state == {"pass_index": 1, "offset": 4, "num_prompts": 10}

    resumed = make_datamodule(tokenizer, seed=5)
    resumed.load_state_dict(state)
    assert [ids(resumed.next_prompts(k)) for k in sizes[3:]] == expected[3:]
    assert resumed.state_dict() == reference.state_dict()


def test_rlvr_datamodule_load_state_dict_missing_key(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match=r"missing \['offset'\]"):
        make_datamodule(tokenizer).load_state_dict({"pass_index": 0})


def test_rlvr_datamodule_train_dataloader_is_buffer(tokenizer: PreTrainedTokenizerFast) -> None:
    dm = make_datamodule(tokenizer)
    assert isinstance(dm.buffer, RolloutBuffer)
    dm.buffer.configure(num_sequences=8, mini_batch_size=4, ppo_epochs=1)
    assert len(dm.train_dataloader()) == 2


class TinyModule(LightningModule):
    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class FixedBatches(RLVRDataModule):
    """Two fixed training batches instead of the rollout buffer: these tests draw prompts only."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(4.0).view(4, 1)), batch_size=2)


class DrawPrompts(Callback):
    def __init__(self) -> None:
        self.drawn: list[list[str]] = []

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.drawn.append(ids(trainer.datamodule.next_prompts(3)))


def fit(
    tokenizer: Any, root: Path, max_epochs: int, ckpt_path: Path | None = None
) -> tuple[Trainer, DrawPrompts]:
    draw = DrawPrompts()
    trainer = Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[draw],
        default_root_dir=root,
    )
    dm = FixedBatches(synthetic={"num_problems": 5}, seed=3, tokenizer=tokenizer)
    trainer.fit(TinyModule(tokenizer), datamodule=dm, ckpt_path=ckpt_path)
    return trainer, draw


def test_rlvr_datamodule_resume_from_lightning_checkpoint(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    _, uninterrupted = fit(tokenizer, tmp_path, max_epochs=4)
    trainer, first = fit(tokenizer, tmp_path, max_epochs=2)
    ckpt = tmp_path / "epoch2.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["FixedBatches"]["pass_index"] == 1
    _, second = fit(tokenizer, tmp_path, max_epochs=4, ckpt_path=ckpt)
    assert len(uninterrupted.drawn) == 4
    assert first.drawn + second.drawn == uninterrupted.drawn


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data folder absent")
def test_rlvr_datamodule_math_train(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.warns(UserWarning, match="dropped 2 of 7500"):
        dm = RLVRDataModule(train_file=str(SHARED_DATA / "math_train.jsonl"), max_prompt_length=256)
    dm.tokenizer = tokenizer
    with pytest.warns(UserWarning, match="filtered"):
        dm.setup("fit")
    assert len(dm.prompts) + dm.num_filtered == 7498
    assert dm.num_filtered > 0
    assert len(dm.next_prompts(64)) == 64
