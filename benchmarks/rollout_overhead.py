"""dgpo's rollout phase against bare vLLM ``generate`` of the same prompts, in one process.

dgpo's rollout phase is what the rollout callback does at the start of an epoch before the
trainer takes over: push the policy's weights into the engine, generate, check the sync,
build the samples, compute the group advantages and fill the buffer. The reward and the
behaviour log-probs are left out: a bare-vLLM trainer needs them too, and ``rl_step`` measures
them. The baseline is ``vllm.LLM.generate`` on the same engine, with the same prompts and
sampling parameters, called right after each epoch (so the two alternate, and the weights are
current: one optimiser step runs between rollouts). Every response is exactly
``--new-tokens`` long (EOS ignored), so both do the same generation work.

    python benchmarks/rollout_overhead.py                # SmolLM2-135M, 16 x 8, 64 tokens
    python benchmarks/rollout_overhead.py --prompts 8 --iterations 6

Last line: the median rollout-phase and bare-generation seconds and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=5, help="timed, after one warm-up")
    args = parser.parse_args()

    from lightning import Callback, Trainer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from dgpo.data import RLVRDataModule, arithmetic_problems
    from dgpo.module import RLVRModule
    from dgpo.rewards.toy import DigitFractionReward
    from dgpo.rollout import RolloutCallback, VLLMEngine

    engine = VLLMEngine(dtype="float32", kv_cache_space_gib=1.0, max_model_len=512,
                        progress_bar=False)
    rollout = RolloutCallback(engine, reward=DigitFractionReward(), n=args.n,
                              rollout_batch_size=args.prompts,
                              mini_batch_size=args.prompts * args.n, ppo_epochs=1,
                              max_new_tokens=args.new_tokens, ignore_eos=True)

    class Stopwatch(Callback):
        """Times the rollout callback's epoch start, then runs bare vLLM on the same prompts."""

        def __init__(self, before: bool) -> None:
            self.before = before

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            now = time.perf_counter()
            if self.before:
                marks["start"] = now
                return
            timings = dict(rollout.last_timings)
            phase = now - marks["start"] - timings["scoring"] - timings["logprobs"]
            record = trainer.datamodule.buffer.samples
            prompts = list({tuple(s.prompt_ids): None for s in record})
            bare = bare_generate([list(p) for p in prompts], trainer.current_epoch)
            rows.append({"rollout_phase": phase, "bare_generate": bare, **timings})

    def bare_generate(prompt_ids: list[list[int]], epoch: int) -> float:
        params = [SamplingParams(n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.new_tokens,
                                 seed=epoch + i * args.n, ignore_eos=True, logprobs=0)
                  for i in range(len(prompt_ids))]
        prompts = [TokensPrompt(prompt_token_ids=p) for p in prompt_ids]
        start = time.perf_counter()
        engine.llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    marks: dict[str, float] = {}
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "problems.jsonl"
        train_file.write_text("".join(json.dumps(p) + "\n"
                                      for p in arithmetic_problems(256, max_operand=20)))
        trainer = Trainer(accelerator="cpu", devices=1, precision="32-true",
                          max_epochs=args.iterations + 1,
                          callbacks=[Stopwatch(before=True), rollout, Stopwatch(before=False)],
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0,
                          use_distributed_sampler=False, default_root_dir=tmp)
        module = RLVRModule(args.model, loss="grpo", lr=1e-6,
                            micro_batch_size=args.prompts * args.n)
        trainer.fit(module, datamodule=RLVRDataModule(train_file=str(train_file),
                                                      max_prompt_length=256,
                                                      tokenizer=module.tokenizer))

    timed = rows[1:]  # the first epoch warms up
    print(f"{args.model}: {args.prompts} prompts x {args.n} samples x {args.new_tokens} tokens, "
          f"{len(timed)} alternating iterations after a warm-up")
    print("| iteration | weight push | generation | sync check | rollout phase | bare generate "
          "| ratio |")
    print("|---|---|---|---|---|---|---|")
    for index, row in enumerate(timed, 1):
        print(f"| {index} | {row['weight_sync']:.2f} | {row['generation']:.2f} | "
              f"{row['sync_check']:.2f} | {row['rollout_phase']:.2f} | "
              f"{row['bare_generate']:.2f} | {row['rollout_phase'] / row['bare_generate']:.3f} |")
    phase = statistics.median(r["rollout_phase"] for r in timed)
    bare = statistics.median(r["bare_generate"] for r in timed)
    print(f"rollout_overhead: dgpo rollout phase {phase:.2f} s, bare vLLM generate {bare:.2f} s, "
          f"ratio {phase / bare:.3f}x")


if __name__ == "__main__":
    main()
