"""The settings of a training job (`meshpilot train`): one typed object, each default and meaning written once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Precision = Literal["fp32", "bf16", "auto"]
Method = Literal["bc", "grpo"]
GGUFType = Literal["q8_0", "f16", "f32", "none"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "auto")
METHODS: tuple[Method, ...] = ("bc", "grpo")
GGUF_TYPES: tuple[GGUFType, ...] = ("q8_0", "f16", "f32", "none")


class TrainSettingsError(ValueError):
    """A setting that cannot be used; the message names the command-line option and says what to change."""


@dataclass(frozen=True)
class TrainSettings:
    """What `meshpilot train` does; the field name with dashes is its option (``attempts`` is ``--attempts``)."""

    name: str = "kg"
    """The job's name: its folder ``<data_dir>/train/<name>`` and its models ``<name>-r1``, ``<name>-r2`` ..."""
    suite: tuple[str, ...] = ("kg-train",)
    """Where tasks come from: the ``train`` split of each of these suites (``--suite`` repeated), one model for all.
    A single name is taken as a tuple of one."""
    eval_suite: tuple[str, ...] = ("kg-test",)
    """What each round is scored on: the ``test`` split of each of these suites (never trained on), reported per
    suite. A single name is taken as a tuple of one."""
    categories: tuple[str, ...] = ()
    """Only these categories of every suite (empty: all)."""
    limit: int = 10
    """Training tasks per category (a fixed sample, file order); 0: all."""
    eval_limit: int = 5
    """Test tasks per category; 0: all."""
    eval_limit_for: tuple[tuple[str, int], ...] = ()
    """(category, N) pairs overriding ``eval_limit`` for those categories (``--eval-limit-for bfcl_simple=60``: a
    one-category suite scored on more tasks than each kg category)."""
    agent: str = ""
    """The agent rolled out ("": the built-in default); its policy must be guided or react."""
    student: str = ""
    """A react agent the rollouts teach: the guided runs rewritten in its action format, with the prompts its policy
    builds (the guided policy as the teacher of a free one); each round evaluates it. "": the rolled-out agent."""
    rounds: int = 1
    """Rollouts -> training -> evaluation, this many times; round r+1 starts from round r's model."""
    attempts: int = 4
    """Rollouts per task (K), each sampled with its own seed."""
    temperature: float = 0.8
    """Sampling temperature of the rollouts (the evaluation is greedy, as the agent is)."""
    seed: int = 14
    """Attempt k of round r samples with seed + 1000 r + k; also the trainer's seed."""
    min_reward: float = 1.0
    """A rollout is trained on when its reward (share of the task's checks passed) is at least this."""
    keep_per_task: int = 1
    """At most this many of a task's rollouts are trained on (the best: highest reward, valid calls, fewest steps)."""
    demonstrations: int = 0
    """Round 1 also learns from verified demonstrations: the reference solutions of up to this many train tasks per
    category (a seeded choice), played against the real tools and kept when the judge passes them; 0: none."""
    demonstrations_for: tuple[tuple[str, int], ...] = ()
    """(category, N) pairs overriding ``demonstrations`` for those categories: more for the shapes the agent confuses
    (``--demonstrations-for reverse=16``), fewer for those it knows."""
    concurrency: int = 2
    """Runs in flight at once through the planner."""
    method: Method = "bc"
    """bc: behaviour cloning on the verified rollouts' steps (reward-filtered); grpo: TRL's GRPO over every rollout's
    step prompts, ``attempts`` samples each, rewarded by services.train.grpo.action_reward."""
    lora: bool = True
    """LoRA adapters (peft) on the attention projections, merged into the exported model; False: full fine-tuning."""
    lora_rank: int = 8
    precision: Precision = "fp32"
    """Training precision: fp32, bf16 mixed precision (autocast), or auto: bf16 where the hardware computes it
    natively (a CUDA GPU with bf16, a CPU with AMX or AVX512-BF16), else fp32. On a CPU without them torch emulates
    bf16 matmuls (measured on an AVX2-only EPYC: a 1536x576x1536 matmul 19 ms in fp32, 2.1 s in bf16)."""
    learning_rate: float = 2e-4
    batch_size: int = 1
    grad_accumulation: int = 4
    """Examples' gradients summed before each optimizer step: an effective batch of batch_size x this."""
    epochs: float = 2.0
    max_steps: int = 0
    """Optimizer steps per round; 0: ``epochs`` over the round's examples."""
    save_steps: int = 20
    """A checkpoint every this many optimizer steps; an interrupted round resumes from the last one."""
    max_length: int = 2048
    """Examples longer than this many tokens (prompt and completion) are left out."""
    teacher: Path | None = None
    """A HF model directory whose token distributions the model is distilled towards (soft targets)."""
    kd_alpha: float = 0.5
    """With a teacher: loss = kd_alpha x soft (KL at kd_temperature, x tau^2) + (1 - kd_alpha) x hard (CE)."""
    kd_temperature: float = 2.0
    gguf: GGUFType = "q8_0"
    """Each round's model is also written as ``<model dir>/model-<type>.gguf`` (the default model's GGUF metadata and
    tokenizer, the trained weights in this type) for llama.cpp and Ollama; none: no GGUF."""
    timeout_s: float = 300.0
    """Seconds a run may take before it counts as failed."""
    lean_prompt: bool = False
    """The trained models read prompts without the planner's built-in worked examples (a third of the system
    prompt's tokens): their training examples are rebuilt without them, and their evaluations and later rounds'
    rollouts run as agents with ``builtin_examples`` off. The untrained baseline and round 1's rollouts keep them."""
    ray: str = ""
    """A Ray cluster's address (the head's HOST:PORT, ray://HOST:PORT or auto): rollouts and evaluation runs are
    made by Ray tasks on its nodes and training runs under Ray Train's TorchTrainer there. "": all in this process."""
    ray_workers: int = 1
    """TorchTrainer's workers (one CPU each) with ``ray``."""

    def __post_init__(self) -> None:
        for option in ("suite", "eval_suite"):
            if isinstance(getattr(self, option), str):  # one suite, as callers before --suite repeated wrote it
                object.__setattr__(self, option, (getattr(self, option),))

    def validate(self) -> TrainSettings:
        """Itself, or TrainSettingsError naming the option to change."""
        for option, names in (("--suite", self.suite), ("--eval-suite", self.eval_suite)):
            if not names:
                raise TrainSettingsError(f"{option}: name at least one suite")
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                raise TrainSettingsError(f"{option} names {', '.join(twice)} twice; give each suite once")
        # With "-r<round>" appended this is a model id (inference_core.model_loading.MODEL_ID) and a file name.
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,40}", self.name):
            raise TrainSettingsError(f"--name {self.name[:60]!r}: use 1-41 lowercase letters, digits and '-'")
        _at_least("--rounds", self.rounds, 1)
        _at_least("--attempts", self.attempts, 1)
        _at_least("--limit", self.limit, 0)
        _at_least("--eval-limit", self.eval_limit, 0)
        _at_least("--keep-per-task", self.keep_per_task, 1)
        _at_least("--demonstrations", self.demonstrations, 0)
        for option, pairs in (
            ("--demonstrations-for", self.demonstrations_for), ("--eval-limit-for", self.eval_limit_for)
        ):  # fmt: skip
            for category, count in pairs:
                _at_least(f"{option} {category}=", count, 0)
            seen = [category for category, _ in pairs]
            if len(set(seen)) < len(seen):
                twice = sorted({c for c in seen if seen.count(c) > 1})
                raise TrainSettingsError(f"{option} names {', '.join(twice)} twice; give each category once")
        _at_least("--concurrency", self.concurrency, 1)
        _at_least("--ray-workers", self.ray_workers, 1)
        if self.ray_workers > 1 and not self.ray:
            raise TrainSettingsError(
                f"--ray-workers {self.ray_workers} needs --ray ADDRESS (without a cluster, training runs here)"
            )
        _at_least("--lora-rank", self.lora_rank, 1)
        _at_least("--batch-size", self.batch_size, 1)
        _at_least("--grad-accumulation", self.grad_accumulation, 1)
        _at_least("--max-steps", self.max_steps, 0)
        _at_least("--save-steps", self.save_steps, 1)
        _at_least("--max-length", self.max_length, 16)
        if not 0.0 <= self.temperature <= 2.0:
            raise TrainSettingsError(f"--temperature is {self.temperature:g}; use 0 to 2 (0 is greedy: no variety)")
        if not 0.0 <= self.min_reward <= 1.0:
            raise TrainSettingsError(f"--min-reward is {self.min_reward:g}; use 0 to 1 (the share of checks passed)")
        if self.method not in METHODS:
            raise TrainSettingsError(f"--method is {self.method!r}; use {' or '.join(METHODS)}")
        if self.method == "grpo" and self.student:
            raise TrainSettingsError(
                "--method grpo trains the rolled-out agent from its own samples; leave --student out"
            )
        if self.precision not in PRECISIONS:
            raise TrainSettingsError(f"--precision is {self.precision!r}; use {', '.join(PRECISIONS)}")
        if self.gguf not in GGUF_TYPES:
            raise TrainSettingsError(f"--gguf is {self.gguf!r}; use {', '.join(GGUF_TYPES)}")
        if not self.learning_rate > 0:
            raise TrainSettingsError(f"--learning-rate is {self.learning_rate:g}; use a positive number such as 2e-4")
        if not self.epochs > 0 and not self.max_steps:
            raise TrainSettingsError(f"--epochs is {self.epochs:g}; use a positive number, or set --max-steps")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise TrainSettingsError(f"--kd-alpha is {self.kd_alpha:g}; use 0 (hard targets only) to 1 (soft only)")
        if not self.kd_temperature > 0:
            raise TrainSettingsError(f"--kd-temperature is {self.kd_temperature:g}; use a positive number such as 2")
        if self.teacher is not None and not (self.teacher / "config.json").is_file():
            where = "does not exist" if not self.teacher.exists() else "has no config.json"
            raise TrainSettingsError(
                f"--teacher {self.teacher} {where}; give a HF model directory (one written by save_pretrained)"
            )
        return self

    def demonstrations_of(self, category: str) -> int:
        """How many demonstrations round 1 plays for ``category``."""
        return dict(self.demonstrations_for).get(category, self.demonstrations)

    @property
    def demonstrates(self) -> bool:
        """Whether round 1 plays any demonstrations."""
        return bool(self.demonstrations or any(count for _, count in self.demonstrations_for))

    def model_id(self, round_number: int) -> str:
        """The id round ``round_number``'s model is registered under."""
        return f"{self.name}-r{round_number}"


def parse_category_counts(option: str, values: list[str]) -> tuple[tuple[str, int], ...]:
    """``["reverse=16", "counting=12"]`` as ((category, count), ...); TrainSettingsError naming ``option`` for a value
    not of the form CATEGORY=N."""
    pairs = []
    for value in values:
        match = re.fullmatch(r"([a-z][a-z0-9_]{0,39})=([0-9]{1,5})", value.strip())
        if match is None:
            raise TrainSettingsError(f"{option} {value[:60]!r}: write CATEGORY=N, such as reverse=16")
        pairs.append((match[1], int(match[2])))
    return tuple(pairs)


def _at_least(option: str, value: int, low: int) -> None:
    if value < low:
        raise TrainSettingsError(f"{option} is {value}; use {low} or more")
