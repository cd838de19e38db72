"""Fine-tuning with HF Trainer on a tiny random Llama (SmolLM2's tokenizer, no download): what is learned (the
completion, not the prompt), checkpoints and resume after an interruption, LoRA merged on export, distillation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from inference_core.testing import write_tiny_llama
from services.train import IGNORE_INDEX, StepExample, TrainSettings
from services.train.finetune import (
    FineTuneError,
    TrainingStopped,
    collate,
    completion_loss,
    export_model,
    fine_tune,
    tokenize_example,
)

EXAMPLES = [
    StepExample(
        f"task-{i}", f"run-{i}", 1,
        [{"role": "system", "content": "Reply with JSON."}, {"role": "user", "content": f"What is the capital of {c}?"}],
        f'{{"tool": "country_facts", "arguments": {{"name": "{c}"}}}}',
    )
    for i, c in enumerate(("France", "Japan", "Kenya", "Peru"))
]  # fmt: skip
TINY = TrainSettings(
    max_steps=4, save_steps=2, batch_size=2, grad_accumulation=2, learning_rate=1e-2, lora_rank=4, seed=3
)


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-train"), context_length=512)


@pytest.fixture(scope="module")
def tokenizer(tiny: Path):
    return AutoTokenizer.from_pretrained(tiny, local_files_only=True)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_only_the_completion_and_its_end_of_turn_are_learned(tokenizer) -> None:
    example = tokenize_example(EXAMPLES[0], tokenizer)
    prompt = tokenizer.apply_chat_template(EXAMPLES[0].messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(example.input_ids) == prompt + EXAMPLES[0].completion + tokenizer.eos_token
    learned = [label for label in example.labels if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == EXAMPLES[0].completion + "<|im_end|>"
    assert example.labels[: len(example.labels) - len(learned)] == [IGNORE_INDEX] * (len(example.labels) - len(learned))

    batch = collate(pad_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_an_interrupted_run_resumes_from_its_last_checkpoint_to_the_same_weights(tiny: Path, tmp_path: Path) -> None:
    whole = fine_tune(EXAMPLES, base=tiny, checkpoints=tmp_path / "whole", settings=TINY)
    assert whole.steps == 4 and whole.examples == 4

    def stop_after_the_first_checkpoint(done: int, total: int) -> None:
        if done == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        fine_tune(
            EXAMPLES, base=tiny, checkpoints=tmp_path / "cut", settings=TINY, on_step=stop_after_the_first_checkpoint
        )
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["checkpoint-2"]
    seen: list[int] = []
    resumed = fine_tune(
        EXAMPLES, base=tiny, checkpoints=tmp_path / "cut", settings=TINY, on_step=lambda done, total: seen.append(done)
    )
    assert seen == [3, 4]  # steps 1-2 came from the checkpoint
    before, after, again = (
        weights(AutoModelForCausalLM.from_pretrained(tiny)),
        weights(whole.model),
        weights(resumed.model),
    )
    assert any(not torch.equal(before[name], after[name]) for name in after)  # it learned something
    for name in after:
        torch.testing.assert_close(again[name], after[name], rtol=1e-4, atol=1e-6)


def test_the_completion_loss_is_transformers_causal_lm_loss_with_the_head_applied_only_where_learned(
    tiny: Path, tokenizer
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    pad = int(tokenizer.eos_token_id)
    batch = collate(pad)([vars(tokenize_example(example, tokenizer)) for example in EXAMPLES[:3]])
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths: padding is not learned either

    for items in (None, 97):
        ours = completion_loss(model, batch, items)
        kwargs = {} if items is None else {"num_items_in_batch": items}
        theirs = model(**batch, **kwargs).loss
        torch.testing.assert_close(ours, theirs)
        (grad_ours,) = torch.autograd.grad(ours, model.model.layers[0].mlp.up_proj.weight)
        (grad_theirs,) = torch.autograd.grad(theirs, model.model.layers[0].mlp.up_proj.weight)
        torch.testing.assert_close(grad_ours, grad_theirs)

    counted: list[int] = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda _module, args, _out: counted.append(args[0].shape[-2]))
    try:
        completion_loss(model, batch)
    finally:
        hook.remove()
    learned = int((batch["labels"] != IGNORE_INDEX).sum())
    assert counted == [learned]  # the head saw one row per learned token, not the whole padded batch


def test_training_with_the_completion_loss_matches_transformers_own_trainer(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Same seed, batch 2 x accumulation 2: the gradient-accumulation scaling must be transformers' own.
    from transformers import Trainer

    from services.train import finetune

    full = dataclasses.replace(TINY, lora=False, max_steps=2)
    ours = fine_tune(EXAMPLES, base=tiny, checkpoints=tmp_path / "ours", settings=full)
    monkeypatch.setattr(finetune, "_completion_trainer", lambda: Trainer)
    theirs = fine_tune(EXAMPLES, base=tiny, checkpoints=tmp_path / "theirs", settings=full)
    assert ours.loss == pytest.approx(theirs.loss, rel=1e-4)
    mine, stock = weights(ours.model), weights(theirs.model)
    changed = 0
    for name in stock:
        torch.testing.assert_close(mine[name], stock[name], rtol=1e-4, atol=1e-6)
        changed += not torch.equal(stock[name], weights(AutoModelForCausalLM.from_pretrained(tiny))[name])
    assert changed  # the steps did train


def test_asked_to_stop_it_checkpoints_that_step_and_a_rerun_goes_on_from_there(tiny: Path, tmp_path: Path) -> None:
    # Ctrl-C during `meshpilot train` asks the trainer to stop (on_step returns True): the step it was on is kept,
    # not only the last save_steps checkpoint.
    whole = fine_tune(EXAMPLES, base=tiny, checkpoints=tmp_path / "whole", settings=TINY)

    with pytest.raises(TrainingStopped) as stopped:
        fine_tune(EXAMPLES, base=tiny, checkpoints=tmp_path / "cut", settings=TINY, on_step=lambda done, _: done == 3)
    assert stopped.value.step == 3 and "run the same command to resume" in str(stopped.value)
    assert "checkpoint-3" in {p.name for p in (tmp_path / "cut").iterdir()}
    seen: list[int] = []
    resumed = fine_tune(
        EXAMPLES, base=tiny, checkpoints=tmp_path / "cut", settings=TINY, on_step=lambda done, _: seen.append(done)
    )
    assert seen == [4]
    after, again = weights(whole.model), weights(resumed.model)
    for name in after:
        torch.testing.assert_close(again[name], after[name], rtol=1e-4, atol=1e-6)


def test_lora_is_merged_on_export_into_a_plain_model_directory(tiny: Path, tmp_path: Path) -> None:
    result = fine_tune(
        EXAMPLES, base=tiny, checkpoints=tmp_path / "ckpt", settings=dataclasses.replace(TINY, max_steps=2)
    )
    exported = export_model(result, tmp_path / "models" / "kg-r1")
    assert (exported / "config.json").is_file() and not (exported / "adapter_config.json").exists()
    assert not list((tmp_path / "models").glob(".*"))  # the partial folder was renamed into place
    reloaded = AutoModelForCausalLM.from_pretrained(exported)
    for name, value in weights(result.model).items():
        torch.testing.assert_close(weights(reloaded)[name], value)


def test_full_fine_tuning_in_bf16_and_distillation_from_a_teacher(tiny: Path, tmp_path: Path) -> None:
    full = dataclasses.replace(TINY, lora=False, precision="bf16", max_steps=2)
    assert fine_tune(EXAMPLES, base=tiny, checkpoints=tmp_path / "bf16", settings=full).steps == 2
    teacher = write_tiny_llama(tmp_path / "teacher", context_length=512, seed=1)
    distilled = dataclasses.replace(TINY, max_steps=2, teacher=teacher, kd_alpha=0.7, kd_temperature=2.0)
    result = fine_tune(EXAMPLES, base=tiny, checkpoints=tmp_path / "kd", settings=distilled)
    assert result.steps == 2 and result.loss > 0


def test_a_teacher_with_another_vocabulary_is_refused_naming_the_option(tiny: Path, tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    model.save_pretrained(teacher)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(teacher)
    settings = dataclasses.replace(TINY, teacher=teacher)
    with pytest.raises(FineTuneError, match=r"--teacher .* vocabulary of \d+ tokens"):
        fine_tune(EXAMPLES, base=tiny, checkpoints=tmp_path / "ckpt", settings=settings)


def test_no_example_short_enough_says_which_options_to_change(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(FineTuneError, match=r"4 over --max-length 16.*--min-reward"):
        fine_tune(EXAMPLES, base=tiny, checkpoints=tmp_path / "c", settings=dataclasses.replace(TINY, max_length=16))
    with pytest.raises(FineTuneError, match=r"no example to train on \(0 rollouts' steps"):
        fine_tune([], base=tiny, checkpoints=tmp_path / "c", settings=TINY)
