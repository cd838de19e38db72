"""Fine-tuning on step examples with HF Trainer: the chat template the inference service renders, loss on the
model's completion only, fp32 or bf16, gradient accumulation, checkpoints every N steps and resume, LoRA (peft) or
full, optional distillation from a teacher; then export as a HF model directory the inference service can serve."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference_core.model_loading import load_model, resolve_model_path
from services.train.examples import StepExample
from services.train.kd import IGNORE_INDEX, distillation_loss
from services.train.settings import TrainSettings

# The attention projections of Llama-family models (SmolLM2 is one): where LoRA adapters go.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this machine computes bf16 matmuls natively: a CUDA GPU that supports bf16, else a CPU with AMX or
    AVX512-BF16 (read from ``cpuinfo``'s flags; False where there is no such file)."""
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        flags = cpuinfo.read_text(errors="replace").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def uses_bf16(settings: TrainSettings) -> bool:
    """Whether training runs in bf16 mixed precision: --precision bf16, or auto on hardware with native bf16."""
    return settings.precision == "bf16" or (settings.precision == "auto" and native_bf16())


class FineTuneError(ValueError):
    """Training cannot start; the message says what to change."""


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of prompt + completion, and labels: IGNORE_INDEX over the prompt, the ids over the completion."""

    input_ids: list[int]
    labels: list[int]


def tokenize_example(example: StepExample, tokenizer: Any) -> TokenizedExample:
    """The chat rendered as the inference service renders it (chat template, generation prompt), then the completion
    and the end-of-turn token the model stopped with; only the completion is learned."""
    prompt = tokenizer.apply_chat_template(example.messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    completion_ids = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"])
    completion_ids.append(int(tokenizer.eos_token_id))
    return TokenizedExample(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids)


class ExampleDataset(torch.utils.data.Dataset[dict[str, list[int]]]):
    def __init__(self, examples: Sequence[TokenizedExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        example = self.examples[index]
        return {"input_ids": example.input_ids, "labels": example.labels}


def collate(pad_id: int) -> Callable[[list[dict[str, list[int]]]], dict[str, torch.Tensor]]:
    """Right padding: pad ids, labels IGNORE_INDEX and attention 0 past each example's end."""

    def pad(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in batch)
        ids, labels, attention = [], [], []
        for item in batch:
            fill = width - len(item["input_ids"])
            ids.append(item["input_ids"] + [pad_id] * fill)
            labels.append(item["labels"] + [IGNORE_INDEX] * fill)
            attention.append([1] * len(item["input_ids"]) + [0] * fill)
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(attention),
        }

    return pad


def base_model_dir(model_path: str, cache: Path) -> Path:
    """A HF directory of the model at ``model_path`` (inference.model_path's form; "" is the default model): itself
    when it is one, else a conversion of its GGUF file written once under ``cache``."""
    directory, gguf = resolve_model_path(model_path or None)
    if gguf is None:
        return directory
    target = cache / Path(gguf).stem
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM

    loaded = load_model(directory / gguf, dtype="float32")
    # The weights are dequantized on load, but the model still says it is GGUF-quantized, which save_pretrained
    # refuses: the same weights in a plain model of the same config.
    config = loaded.model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.model.state_dict())
    partial = cache / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    loaded.tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def load_pretrained(directory: Path) -> tuple[Any, Any]:
    """The fp32 model and the tokenizer of a HF directory, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # model hubs are unreachable in our deployments
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    return model, tokenizer


@dataclass(frozen=True)
class FineTuneResult:
    """The trained model (adapters merged) and its tokenizer, with the run's figures."""

    model: Any
    tokenizer: Any
    examples: int
    skipped_too_long: int
    steps: int
    loss: float


class TrainingStopped(Exception):
    """Training stopped because ``on_step`` asked it to (Ctrl-C): a checkpoint of the last step was written, and the
    same call resumes from it."""

    def __init__(self, step: int) -> None:
        super().__init__(f"training stopped at step {step}; its checkpoint is kept: run the same command to resume")
        self.step = step


def fine_tune(
    examples: Sequence[StepExample],
    *,
    base: Path,
    checkpoints: Path,
    settings: TrainSettings,
    on_step: Callable[[int, int], bool | None] | None = None,
) -> FineTuneResult:
    """Trains the model in ``base`` (a HF directory) on ``examples``; checkpoints go to ``checkpoints`` every
    ``settings.save_steps`` optimizer steps, and a call that finds one there resumes from the last (optimizer,
    scheduler, RNG and data position included). ``on_step(done, total)`` after each optimizer step; when it returns
    True, that step is checkpointed and TrainingStopped raised."""
    from transformers import PrinterCallback, TrainerCallback, TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    set_seed(settings.seed)  # LoRA's initial weights too: a round run again starts from the same ones
    model, tokenizer = load_pretrained(base)
    tokenized = [tokenize_example(example, tokenizer) for example in examples]
    kept = [example for example in tokenized if len(example.input_ids) <= settings.max_length]
    if not kept:
        raise FineTuneError(
            f"no example to train on ({len(tokenized)} rollouts' steps, {len(tokenized) - len(kept)} over "
            f"--max-length {settings.max_length}); run more tasks or attempts (--limit, --attempts), lower "
            "--min-reward, or raise --max-length"
        )
    if settings.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, lora_dropout=0.0,
            target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM",
        )  # fmt: skip
        model = get_peft_model(model, lora)
    teacher = _teacher(settings, model) if settings.teacher is not None else None
    arguments = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accumulation,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=0,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        logging_steps=1,
        bf16=uses_bf16(settings),
        use_cpu=not torch.cuda.is_available(),
        seed=settings.seed,
        data_seed=settings.seed,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )

    trainer_class = _completion_trainer() if teacher is None else _distillation_trainer(teacher, settings)
    trainer = trainer_class(
        model=model,
        args=arguments,
        train_dataset=ExampleDataset(kept),
        data_collator=collate(
            int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        ),
        callbacks=[progress := stepping(on_step, TrainerCallback)],
    )
    trainer.remove_callback(PrinterCallback)  # it prints each step's logs on stdout, which `--json` keeps for its JSON
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    output = trainer.train(resume_from_checkpoint=last)
    if progress.stopped_at is not None:
        raise TrainingStopped(progress.stopped_at)
    trained = model.merge_and_unload() if settings.lora else model
    return FineTuneResult(
        trained, tokenizer, len(kept), len(tokenized) - len(kept), int(output.global_step), float(output.training_loss)
    )


def stepping(on_step: Callable[[int, int], bool | None] | None, base: type) -> Any:
    """A TrainerCallback (``base``: transformers' class, imported by the caller) that calls ``on_step(done, total)``
    after each optimizer step and, when it returns True, has the trainer checkpoint that step and stop; then
    ``stopped_at`` is the step."""

    class Progress(base):  # type: ignore[misc, valid-type]
        stopped_at: int | None = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if on_step is not None and on_step(state.global_step, state.max_steps):
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = state.global_step

    return Progress()


def completion_loss(
    model: Any, inputs: dict[str, torch.Tensor], num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """The causal LM loss on the completion's tokens, with the LM head applied only where a label is learned: position
    i predicts token i + 1, so logits are computed for the positions whose next label is not IGNORE_INDEX (what
    ``logits_to_keep`` takes as a boolean mask). The prompt is most of each example's tokens, and the head (vocabulary
    x hidden, 49152 x 576 for SmolLM2-135M) is a fifth of the model's multiplies per token; the full logits of a
    600-token example are also 118 MB of fp32 to softmax. Summed over the learned tokens and divided by
    ``num_items_in_batch`` (the learned tokens of the whole accumulated batch) when given, as transformers' own causal
    LM loss does; else their mean."""
    labels = inputs["labels"]
    learned = torch.zeros_like(labels, dtype=torch.bool)
    learned[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    logits = model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=learned
    ).logits
    targets = labels[:, 1:][learned[:, :-1]]
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets, reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else max(int(targets.numel()), 1))


def _completion_trainer() -> Any:
    """A Trainer whose loss is ``completion_loss``."""
    from transformers import Trainer

    class CompletionTrainer(Trainer):
        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, torch.Tensor],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            if return_outputs:  # evaluation with outputs: transformers' own path
                return super().compute_loss(model, inputs, True, num_items_in_batch)
            # Divided by the accumulated batch's token count when the Trainer gives it: then it must not divide by
            # the accumulation steps again.
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            return completion_loss(model, inputs, num_items_in_batch)

    return CompletionTrainer


def _teacher(settings: TrainSettings, student: Any) -> Any:
    assert settings.teacher is not None
    teacher, _ = load_pretrained(settings.teacher)
    size, own = teacher.get_output_embeddings().weight.shape[0], student.get_output_embeddings().weight.shape[0]
    if size != own:
        raise FineTuneError(
            f"--teacher {settings.teacher} has a vocabulary of {size} tokens and the model {own}; "
            "distill from a model with the same tokenizer"
        )
    teacher.eval()
    return teacher


def _distillation_trainer(teacher: Any, settings: TrainSettings) -> Any:
    """A Trainer whose loss is ``distillation_loss`` against ``teacher``'s logits on the same batch."""
    from transformers import Trainer

    class DistillationTrainer(Trainer):
        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, torch.Tensor],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            with torch.no_grad():
                teacher_logits = teacher.to(outputs.logits.device)(**inputs).logits
            # Position i predicts token i + 1: drop the last logits and the first label.
            loss = distillation_loss(
                outputs.logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:],
                temperature=settings.kd_temperature, alpha=settings.kd_alpha,
            )  # fmt: skip
            return (loss, outputs) if return_outputs else loss

    return DistillationTrainer


def export_model(result: FineTuneResult, destination: Path) -> Path:
    """Writes the trained model and tokenizer as a HF directory at ``destination``, atomically: a folder beside it is
    renamed into place once complete, so the inference service never loads a half-written model."""
    partial = destination.parent / f".{destination.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(partial)
    result.tokenizer.save_pretrained(partial)
    shutil.rmtree(destination, ignore_errors=True)
    partial.rename(destination)
    return destination
