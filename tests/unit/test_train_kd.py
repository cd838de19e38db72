"""The distillation loss against values worked out by hand on two-token vocabularies."""

from __future__ import annotations

import math

import pytest
import torch

from services.train import IGNORE_INDEX, distillation_loss

# One position, vocabulary of 2: the student is uniform, the teacher gives 3:1 (logits ln 3 and 0), the label is 0.
STUDENT = torch.tensor([[[0.0, 0.0]]])
TEACHER = torch.tensor([[[math.log(3.0), 0.0]]])
LABELS = torch.tensor([[0]])
# tau = 1: KL(0.75, 0.25 || 0.5, 0.5) = 0.75 ln 1.5 + 0.25 ln 0.5; cross-entropy = ln 2.
KL_TAU_1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)  # 0.130812
CE = math.log(2.0)  # 0.693147
# tau = 2: the teacher's logits halved give p = sqrt(3) / (sqrt(3) + 1) = 0.633975; KL is multiplied by tau^2 = 4.
P = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)
KL_TAU_2 = P * math.log(2 * P) + (1 - P) * math.log(2 * (1 - P))  # 0.036341


def test_soft_and_hard_terms_weighted_by_alpha_at_temperature_1() -> None:
    loss = distillation_loss(STUDENT, TEACHER, LABELS, temperature=1.0, alpha=0.5)
    assert loss.item() == pytest.approx(0.5 * KL_TAU_1 + 0.5 * CE, abs=1e-6)
    assert loss.item() == pytest.approx(0.411980, abs=1e-6)


def test_the_soft_term_is_scaled_by_tau_squared() -> None:
    loss = distillation_loss(STUDENT, TEACHER, LABELS, temperature=2.0, alpha=1.0)
    assert loss.item() == pytest.approx(4 * KL_TAU_2, abs=1e-6)
    assert loss.item() == pytest.approx(0.145363, abs=1e-6)


def test_alpha_0_is_plain_cross_entropy_and_ignored_positions_do_not_count() -> None:
    student = torch.cat([STUDENT, torch.tensor([[[5.0, -5.0]]])], dim=1)  # a second, ignored position
    teacher = torch.cat([TEACHER, torch.tensor([[[-5.0, 5.0]]])], dim=1)
    labels = torch.tensor([[0, IGNORE_INDEX]])
    assert distillation_loss(student, teacher, labels, temperature=1.0, alpha=0.0).item() == pytest.approx(CE)
    assert distillation_loss(student, teacher, labels, temperature=1.0, alpha=1.0).item() == pytest.approx(KL_TAU_1)


def test_a_teacher_that_agrees_adds_nothing_and_gradients_flow() -> None:
    student = STUDENT.clone().requires_grad_(True)
    loss = distillation_loss(student, STUDENT, LABELS, temperature=2.0, alpha=1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    distillation_loss(student, TEACHER, LABELS, temperature=2.0, alpha=0.5).backward()
    assert student.grad is not None and student.grad[0, 0, 0] < 0 < student.grad[0, 0, 1]  # towards token 0


def test_no_labelled_position_gives_zero_and_bad_arguments_are_refused() -> None:
    labels = torch.tensor([[IGNORE_INDEX]])
    assert distillation_loss(STUDENT, TEACHER, labels, temperature=1.0, alpha=0.5).item() == 0.0
    with pytest.raises(ValueError, match="share the student's vocabulary"):
        distillation_loss(STUDENT, torch.zeros(1, 1, 3), LABELS, temperature=1.0, alpha=0.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distillation_loss(STUDENT, TEACHER, LABELS, temperature=0.0, alpha=0.5)
    with pytest.raises(ValueError, match=r"alpha in \[0, 1\]"):
        distillation_loss(STUDENT, TEACHER, LABELS, temperature=1.0, alpha=1.5)
