"""The learning loop: rollouts through the mesh, reward filtering, fine-tuning (LoRA or full, optional distillation),
export and registration with the inference service, and evaluation on the test split, round by round."""

from services.train.examples import (
    ExampleError,
    Rollout,
    StepExample,
    react_action,
    select_rollouts,
    step_examples,
    student_examples,
    tools_from_json,
    tools_to_json,
)
from services.train.kd import IGNORE_INDEX, distillation_loss
from services.train.settings import TrainSettings, TrainSettingsError

__all__ = [
    "IGNORE_INDEX",
    "ExampleError",
    "Rollout",
    "StepExample",
    "TrainSettings",
    "TrainSettingsError",
    "distillation_loss",
    "react_action",
    "select_rollouts",
    "step_examples",
    "student_examples",
    "tools_from_json",
    "tools_to_json",
]
