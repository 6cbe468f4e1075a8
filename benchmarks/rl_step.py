"""A full RL iteration of dgpo against TRL's GRPOTrainer at equal work.

One iteration = generate ``n`` samples for each of ``prompts`` prompts, score them, compute the
group advantages (and any behaviour log-probs the trainer needs), and take one optimiser step on
all the samples. Both trainers get the same model (float32), the same prompts (chat template),
the same reward function, the same sampling (temperature 1, every response exactly
``new_tokens`` long: EOS is ignored, so the work does not depend on what was sampled), one
optimiser step per iteration with every sample in one micro-batch, and no KL term.

Each implementation runs in its own process, the runs alternating (TRL, dgpo with each engine,
TRL, ...); in each run the first ``--warmup`` iterations are excluded and the next ``--steps``
are timed (wall clock from one iteration's start to the next). TRL runs with its own defaults
otherwise, which include gradient checkpointing (``--trl-gradient-checkpointing off`` turns it
off); dgpo runs with its defaults (no gradient checkpointing).

    pip install -e ".[bench]"
    python benchmarks/rl_step.py --model smollm2          # SmolLM2-135M-Instruct, 2 x 8, 64 tokens
    python benchmarks/rl_step.py --model tiny             # a tiny random Qwen2, 4 x 8, 32 tokens

Last line: the median seconds per iteration of each and dgpo's speed-up (TRL s/step ÷ dgpo s/step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    # name: (model, prompts, samples per prompt, new tokens)
    "smollm2": ("builtin:smollm2-135m-instruct", 2, 8, 64),
    "tiny": ("builtin:tiny-qwen2", 4, 8, 32),
}
IMPLEMENTATIONS = ("trl", "dgpo-vllm", "dgpo-transformers")
PROMPT = "{problem}\nPut the final answer in \\boxed{{}}."


def problems(count: int = 64) -> list[str]:
    from dgpo.data import arithmetic_problems

    return [PROMPT.format(problem=p["problem"]) for p in arithmetic_problems(count, max_operand=20)]


def reward_scores(texts: list[str]) -> list[float]:
    """The shared reward: dgpo's toy digit-fraction reward (cheap, varies within a group)."""
    from dgpo.rewards.toy import DigitFractionReward

    return DigitFractionReward().score(texts, [""] * len(texts))


# ------------------------------------------------------------------------------------------- dgpo
def run_dgpo(engine_name: str, model: str, prompts: int, n: int, new_tokens: int,
             iterations: int, workdir: Path) -> list[dict]:
    from lightning import Callback, Trainer

    from dgpo.data import RLVRDataModule
    from dgpo.module import RLVRModule
    from dgpo.rewards.toy import DigitFractionReward
    from dgpo.rollout import RolloutCallback, TransformersEngine, VLLMEngine

    train_file = workdir / "problems.jsonl"
    train_file.write_text("".join(json.dumps({"problem": p, "answer": "0"}) + "\n"
                                  for p in problems()))
    if engine_name == "vllm":
        engine = VLLMEngine(dtype="float32", kv_cache_space_gib=1.0, max_model_len=512,
                            progress_bar=False)
    else:
        engine = TransformersEngine(dtype="float32")

    class IterationTimer(Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.phases: list[dict] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._mark(trainer)

        def on_train_end(self, trainer, pl_module) -> None:
            self._mark(trainer)

        def _mark(self, trainer) -> None:
            if self.starts:  # the previous iteration's rollout phases and response length
                lengths = [len(c.token_ids) for c in rollout.last_rollout.completions]
                self.phases.append({**rollout.last_timings,
                                    "response_tokens": sum(lengths) / len(lengths)})
            self.starts.append(time.perf_counter())

    timer = IterationTimer()
    rollout = RolloutCallback(engine, reward=DigitFractionReward(), n=n,
                              rollout_batch_size=prompts, mini_batch_size=prompts * n,
                              ppo_epochs=1, temperature=1.0, max_new_tokens=new_tokens,
                              ignore_eos=True)
    module = RLVRModule(model, loss="grpo", lr=1e-6, micro_batch_size=prompts * n)
    data = RLVRDataModule(train_file=str(train_file), template="{problem}",
                          max_prompt_length=256, tokenizer=module.tokenizer)
    trainer = Trainer(accelerator="cpu", devices=1, precision="32-true", max_epochs=iterations,
                      callbacks=[timer, rollout], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, use_distributed_sampler=False,
                      default_root_dir=str(workdir))
    trainer.fit(module, datamodule=data)
    return [{"seconds": b - a, **phases} for a, b, phases
            in zip(timer.starts[:-1], timer.starts[1:], timer.phases, strict=True)]


# -------------------------------------------------------------------------------------------- TRL
def run_trl(model: str, prompts: int, n: int, new_tokens: int, iterations: int, workdir: Path,
            gradient_checkpointing: bool) -> list[dict]:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dgpo.models import resolve_model

    path = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in problems()])

    def reward(completions, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return reward_scores(texts)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.starts.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kwargs):
            self.starts.append(time.perf_counter())

    config = GRPOConfig(
        output_dir=str(workdir), use_cpu=True, bf16=False, fp16=False, seed=0,
        model_init_kwargs={"dtype": "float32"},
        per_device_train_batch_size=prompts * n, gradient_accumulation_steps=1,
        num_generations=n, max_completion_length=new_tokens, temperature=1.0,
        generation_kwargs={"min_new_tokens": new_tokens},  # equal work: no early EOS
        learning_rate=1e-6, beta=0.0, max_steps=iterations, logging_steps=1,
        save_strategy="no", report_to="none", dataloader_num_workers=0,
        gradient_checkpointing=gradient_checkpointing, disable_tqdm=True,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=path, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    lengths = [entry["completions/mean_length"] for entry in trainer.state.log_history
               if "completions/mean_length" in entry]
    return [{"seconds": b - a, "response_tokens": length} for a, b, length
            in zip(timer.starts[:-1], timer.starts[1:], lengths, strict=True)]


# ----------------------------------------------------------------------------------------- driver
def worker(args: argparse.Namespace) -> None:
    model, prompts, n, new_tokens = MODELS[args.model]
    iterations = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as tmp:
        if args.worker == "trl":
            steps = run_trl(model, prompts, n, new_tokens, iterations, Path(tmp),
                            args.trl_gradient_checkpointing == "on")
        else:
            steps = run_dgpo(args.worker.split("-")[1], model, prompts, n, new_tokens,
                             iterations, Path(tmp))
    print("RESULT " + json.dumps(steps[args.warmup:]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--implementations", nargs="+", choices=IMPLEMENTATIONS,
                        default=list(IMPLEMENTATIONS))
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each")
    parser.add_argument("--steps", type=int, default=2, help="timed iterations per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per run")
    parser.add_argument("--trl-gradient-checkpointing", choices=("on", "off"), default="on",
                        help="TRL's GRPOConfig default is on")
    parser.add_argument("--worker", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    model, prompts, n, new_tokens = MODELS[args.model]
    print(f"{model}: {prompts} prompts x {n} samples x {new_tokens} new tokens, float32, "
          f"1 optimiser step per iteration; {args.repeats} alternating runs x {args.steps} "
          f"timed iterations (+{args.warmup} warm-up); TRL gradient checkpointing "
          f"{args.trl_gradient_checkpointing}", flush=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    results: dict[str, list[dict]] = {impl: [] for impl in args.implementations}
    for repeat in range(args.repeats):
        for impl in args.implementations:
            command = [sys.executable, __file__, "--worker", impl, "--model", args.model,
                       "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--trl-gradient-checkpointing", args.trl_gradient_checkpointing]
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                tail = "\n".join(done.stderr.strip().splitlines()[-15:])
                sys.exit(f"{impl} failed (exit {done.returncode}):\n{tail}")
            steps = json.loads(lines[-1][len("RESULT "):])
            results[impl] += steps
            print(f"run {repeat + 1} {impl}: " + ", ".join(f"{s['seconds']:.2f}" for s in steps)
                  + f" s/iteration ({time.perf_counter() - started:.0f} s with start-up)",
                  flush=True)

    medians = {impl: statistics.median(s["seconds"] for s in steps)
               for impl, steps in results.items()}
    print("| implementation | s/iteration (median) | phases (median s), response tokens |")
    print("|---|---|---|")
    for impl, steps in results.items():
        keys = sorted({k for s in steps for k in s if k != "seconds"})
        phases = ", ".join(f"{k} {statistics.median(s[k] for s in steps if k in s):.2f}"
                           for k in keys)
        print(f"| {impl} | {medians[impl]:.2f} | {phases or '-'} |")
    summary = [f"{impl} {medians[impl]:.2f} s" for impl in medians]
    if "trl" in medians:
        summary += [f"{impl} {medians['trl'] / medians[impl]:.2f}x TRL"
                    for impl in medians if impl != "trl"]
    print(f"rl_step {args.model}: " + "; ".join(summary))


if __name__ == "__main__":
    main()
