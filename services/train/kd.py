"""Knowledge distillation: the student learns the teacher's token distributions (soft targets at a temperature) as
well as the rollouts' tokens (hard targets), as in Hinton et al., "Distilling the Knowledge in a Neural Network"."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where the loss is computed: `meshpilot --help` need not load it
    import torch

# Label of a position that is not trained on (the prompt, padding): the value HF's losses skip.
IGNORE_INDEX = -100


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """``alpha * tau^2 * KL(teacher_tau || student_tau) + (1 - alpha) * CE(student, labels)``, each a mean over the
    positions whose label is not IGNORE_INDEX.

    Logits are ``[..., vocab]`` and labels ``[...]``, already aligned (position i's logits predict labels[i]). The
    tau^2 factor keeps the soft term's gradients on the scale of the hard term's whatever the temperature. A batch
    with no labelled position gives 0 (connected to the graph, so backward still runs)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ; "
            "the teacher must share the student's vocabulary"
        )
    if not temperature > 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"temperature must be > 0 (got {temperature}) and alpha in [0, 1] (got {alpha})")
    import torch.nn.functional as F

    mask = labels != IGNORE_INDEX
    if not mask.any():
        return student_logits.sum() * 0.0
    student, teacher, targets = student_logits[mask].float(), teacher_logits[mask].float(), labels[mask]
    soft = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    ) * (temperature**2)
    hard = F.cross_entropy(student, targets)
    return alpha * soft + (1.0 - alpha) * hard
