"""Starting accuracy of a model on synthetic arithmetic tasks: is there room to learn?

Samples ``--n`` answers to ``--prompts`` held-out problems of each task with the quickstart's
engine settings (vLLM on CPU, float32, temperature 1) and scores them with the quickstart's
reward (math-verify, lenient extraction). A task for comparing losses should start at 5-25 %.

    python benchmarks/task_difficulty.py --tasks "+:20:2" "+-:99:3" "+-*:20:3" --prompts 64 --n 4
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--tasks", nargs="+", default=["+:20:2", "+-:99:3", "+-*:20:3"],
                        help="OPERATIONS:MAX_OPERAND:NUM_OPERANDS")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1, help="the problems' seed (held out: 1)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from dgpo.data import RLVRDataModule
    from dgpo.models import resolve_model
    from dgpo.rewards import MathVerifyReward, call_reward
    from dgpo.rollout import SamplingConfig, VLLMEngine

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    engine = VLLMEngine(path, dtype="float32", kv_cache_space_gib=1.0, max_model_len=512,
                        progress_bar=False)
    reward = MathVerifyReward(extraction="lenient", num_workers=2)
    reward.start()
    sampling = SamplingConfig(n=args.n, temperature=1.0, max_new_tokens=args.max_new_tokens,
                              seed=0)
    print("| task | operations | max operand | operands | accuracy | groups solved by none |")
    print("|---|---|---|---|---|---|")
    for task in args.tasks:
        operations, max_operand, operands = task.split(":")
        data = RLVRDataModule(
            synthetic={"num_problems": args.prompts, "operations": list(operations),
                       "max_operand": int(max_operand), "num_operands": int(operands),
                       "seed": args.seed},
            template="{problem}\nPut the final answer in \\boxed{{}}.", max_prompt_length=256,
            tokenizer=tokenizer)
        data.setup("fit")
        prompts = data.prompts
        start = time.perf_counter()
        completions = engine.generate([p.prompt_ids for p in prompts], sampling)
        out = call_reward(reward, [c.text for c in completions],
                          [prompts[c.prompt_index].answer for c in completions])
        correct = [bool(c) for c in out.correct]
        groups = [correct[i:i + args.n] for i in range(0, len(correct), args.n)]
        none = sum(not any(g) for g in groups) / len(groups)
        seconds = time.perf_counter() - start
        print(f"| {task} | {' '.join(operations)} | {max_operand} | {operands} | "
              f"{sum(correct) / len(correct):.3f} | {none:.2f} |  ({seconds:.0f} s)", flush=True)
    reward.close()
    engine.close()


if __name__ == "__main__":
    main()
