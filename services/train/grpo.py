"""GRPO (TRL's GRPOTrainer) as an alternative to behaviour cloning: for each step prompt of the round's rollouts the
model samples a group of actions, each scored by ``action_reward``, and is pushed towards the better ones of its group.
The rewards are the loop's own: a verified answer, a valid call, the call a verified run made."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema

from services.eval.checks import Trajectory
from services.eval.suite import EvalTask, judge
from services.planner.types import ToolSpec
from services.train.examples import Rollout, StepExample
from services.train.finetune import (
    LORA_TARGETS,
    FineTuneError,
    FineTuneResult,
    TrainingStopped,
    load_pretrained,
    stepping,
    uses_bf16,
)
from services.train.settings import TrainSettings

# An action is a short JSON object; a longer sample is rambling, and generating it is what costs time on a CPU.
MAX_ACTION_TOKENS = 96
VERIFIED_CALL, VALID_CALL = 1.0, 0.5

Call = tuple[str, str]  # (tool, arguments as sorted JSON)


def _call(tool: str, arguments: Mapping[str, Any]) -> Call:
    return tool, json.dumps(arguments, sort_keys=True, ensure_ascii=False)


def verified_calls(rollouts: Sequence[Rollout], min_reward: float) -> dict[tuple[str, int], set[Call]]:
    """The calls verified runs made, by (task id, step): what a sampled call at that step is rewarded for matching."""
    calls: dict[tuple[str, int], set[Call]] = {}
    for rollout in rollouts:
        if rollout.error or rollout.reward < min_reward:
            continue
        for step, text in rollout.outputs.items():
            try:
                action = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(action, dict) and isinstance(action.get("tool"), str):
                calls.setdefault((rollout.task_id, step), set()).add(_call(action["tool"], action.get("arguments", {})))
    return calls


def action_reward(text: str, task: EvalTask, verified: set[Call], tools: Mapping[str, ToolSpec]) -> float:
    """A sampled action's reward: a final answer earns the share of the task's checks it passes; a tool call earns
    VERIFIED_CALL when a verified run made the same call at that step, VALID_CALL when it names one of the agent's
    tools with arguments its schema accepts, else 0; anything that is not an action earns 0."""
    try:
        action = json.loads(text)
    except json.JSONDecodeError:
        return 0.0
    if not isinstance(action, dict):
        return 0.0
    if isinstance(action.get("final_answer"), str):
        return judge(task, Trajectory(action["final_answer"])).reward
    tool, arguments = action.get("tool"), action.get("arguments")
    if not isinstance(tool, str) or not isinstance(arguments, dict):
        return 0.0
    if _call(tool, arguments) in verified:
        return VERIFIED_CALL
    spec = tools.get(tool)
    if spec is None:
        return 0.0
    try:
        jsonschema.validate(arguments, spec.input_schema or {"type": "object"})
    except jsonschema.ValidationError:
        return 0.0
    return VALID_CALL


def reward_function(
    tasks: Mapping[str, EvalTask], calls: Mapping[tuple[str, int], set[Call]], tools: Sequence[ToolSpec]
) -> Callable[..., list[float | None]]:
    """``action_reward`` as TRL calls a reward function: the group's completions with their rows' task and step."""
    by_name = {tool.name: tool for tool in tools}

    def rewards(completions: list[Any], task_id: list[str], step: list[int], **_: Any) -> list[float | None]:
        texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        return [
            action_reward(text, tasks[t], calls.get((t, s), set()), by_name)
            for text, t, s in zip(texts, task_id, step, strict=True)
        ]

    rewards.__name__ = "action_reward"
    return rewards


def grpo_tune(
    prompts: Sequence[StepExample],
    reward: Callable[..., list[float | None]],
    *,
    base: Path,
    checkpoints: Path,
    settings: TrainSettings,
    on_step: Callable[[int, int], bool | None] | None = None,
) -> FineTuneResult:
    """GRPO from the model in ``base`` over ``prompts`` (their messages; completions are sampled, ``settings.attempts``
    per prompt at ``settings.temperature``), with checkpoints and resume as ``fine_tune``; LoRA merged on return."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback, set_seed
    from transformers.trainer_utils import get_last_checkpoint
    from trl import GRPOConfig, GRPOTrainer

    if not prompts:
        raise FineTuneError("no step prompt to sample from; run more tasks or attempts (--limit, --attempts)")
    if settings.attempts < 2:
        raise FineTuneError("--method grpo compares a group of samples per prompt; use --attempts 2 or more")
    set_seed(settings.seed)
    model, tokenizer = load_pretrained(base)
    rows = [{"prompt": p.messages, "task_id": p.task_id, "step": p.step} for p in prompts]
    config = GRPOConfig(
        output_dir=str(checkpoints), num_generations=settings.attempts, per_device_train_batch_size=settings.attempts,
        gradient_accumulation_steps=settings.grad_accumulation, max_completion_length=MAX_ACTION_TOKENS,
        temperature=settings.temperature or 1.0, learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs, max_steps=settings.max_steps or -1, save_strategy="steps",
        save_steps=settings.save_steps, save_total_limit=2, logging_steps=1, bf16=uses_bf16(settings),
        use_cpu=True, seed=settings.seed, report_to=[], disable_tqdm=True,
    )  # fmt: skip
    peft_config = None
    if settings.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, lora_dropout=0.0,
            target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM",
        )  # fmt: skip

    progress = stepping(on_step, TrainerCallback)
    trainer = GRPOTrainer(
        model=model, reward_funcs=[reward], args=config, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, peft_config=peft_config, callbacks=[progress],
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    output = trainer.train(resume_from_checkpoint=last)
    if progress.stopped_at is not None:
        raise TrainingStopped(progress.stopped_at)
    tuned: Any = trainer.model
    trained = tuned.merge_and_unload() if settings.lora else tuned
    return FineTuneResult(trained, tokenizer, len(rows), 0, int(output.global_step), float(output.training_loss))
