"""Evaluation: mIoU from a whole-set confusion matrix, per-case Dice and HD95, JSON/Markdown reports.

The conventions (how IoU is accumulated, units, absent classes) are stated in
:mod:`biosam2.evaluation.metrics` and written into every report as :data:`CONVENTION`.
"""

from biosam2.evaluation.evaluate import evaluate_folders, evaluate_into
from biosam2.evaluation.metrics import CONVENTION, Evaluator
from biosam2.evaluation.report import CaseResult, EvaluationResult

__all__ = ["CONVENTION", "CaseResult", "EvaluationResult", "Evaluator", "evaluate_folders", "evaluate_into"]
