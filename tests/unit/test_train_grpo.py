"""GRPO as the training method: the rewards of sampled actions (verified answer, verified or valid call) and a step of
TRL's GRPOTrainer on a tiny random Llama."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from inference_core.testing import write_tiny_llama
from services.eval import Contains, EvalTask
from services.train import Rollout, StepExample, TrainSettings
from services.train.finetune import FineTuneError
from services.train.grpo import VALID_CALL, VERIFIED_CALL, action_reward, grpo_tune, reward_function, verified_calls
from tests.unit.planner_fakes import COUNTRY_FACTS, answer, call

FRANCE = EvalTask("capital-FR", "What is the capital of France?", (Contains(("Paris",)),), "one_hop", "train")
TOOLS = {COUNTRY_FACTS.name: COUNTRY_FACTS}


def rollout(attempt: int, outputs: list[str], reward: float) -> Rollout:
    steps = dict(enumerate(outputs, start=1))
    return Rollout(FRANCE.id, "one_hop", attempt, f"r{attempt}", reward, reward == 1.0, 2, 1, 1, "", "", steps, "")


def test_sampled_actions_are_rewarded_for_verified_answers_and_calls() -> None:
    rollouts = [
        rollout(0, [call("country_facts", country="France"), answer("The capital of France is Paris.")], 1.0),
        rollout(1, [call("country_facts", country="Frankreich"), answer("I could not find the answer.")], 0.0),
    ]
    calls = verified_calls(rollouts, min_reward=1.0)
    assert calls == {(FRANCE.id, 1): {("country_facts", '{"country": "France"}')}}
    verified = calls[(FRANCE.id, 1)]
    assert action_reward(call("country_facts", country="France"), FRANCE, verified, TOOLS) == VERIFIED_CALL
    assert action_reward(call("country_facts", country="Chile"), FRANCE, verified, TOOLS) == VALID_CALL
    assert action_reward(call("country_facts", nation="France"), FRANCE, verified, TOOLS) == 0.0  # schema refuses
    assert action_reward(call("weather", city="Paris"), FRANCE, verified, TOOLS) == 0.0  # not the agent's tool
    assert action_reward(answer("It is Paris."), FRANCE, set(), TOOLS) == 1.0
    assert action_reward(answer("It is Lyon."), FRANCE, set(), TOOLS) == 0.0
    assert action_reward('{"final_answer": "Paris"', FRANCE, set(), TOOLS) == 0.0  # not complete JSON
    assert action_reward("[1, 2]", FRANCE, set(), TOOLS) == 0.0

    reward = reward_function({FRANCE.id: FRANCE}, calls, [COUNTRY_FACTS])
    completions = [[{"role": "assistant", "content": answer("Paris")}], [{"role": "assistant", "content": "Lyon"}]]
    assert reward(completions=completions, task_id=[FRANCE.id] * 2, step=[2, 2], prompts=[[], []]) == [1.0, 0.0]


def test_a_grpo_step_on_a_tiny_model_and_its_bad_inputs(tmp_path: Path) -> None:
    tiny = write_tiny_llama(tmp_path / "tiny", context_length=512)
    messages = [{"role": "system", "content": "Reply with JSON."}, {"role": "user", "content": FRANCE.task}]
    prompts = [StepExample(FRANCE.id, "r0", 1, messages, "")]
    reward = reward_function({FRANCE.id: FRANCE}, {}, [COUNTRY_FACTS])
    settings = TrainSettings(attempts=2, max_steps=1, grad_accumulation=1, save_steps=1, temperature=1.0)
    result = grpo_tune(prompts, reward, base=tiny, checkpoints=tmp_path / "ckpt", settings=settings)
    assert result.steps == 1 and result.examples == 1
    assert (tmp_path / "ckpt" / "checkpoint-1").is_dir()
    assert not hasattr(result.model, "peft_config")  # LoRA merged: a plain model to export

    with pytest.raises(FineTuneError, match="no step prompt"):
        grpo_tune([], reward, base=tiny, checkpoints=tmp_path / "c", settings=settings)
    with pytest.raises(FineTuneError, match="use --attempts 2 or more"):
        grpo_tune(
            prompts, reward, base=tiny, checkpoints=tmp_path / "c", settings=dataclasses.replace(settings, attempts=1)
        )
