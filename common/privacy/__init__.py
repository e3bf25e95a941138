"""Differential privacy at a site: the ledger (accounting) and the DP-SGD trainer."""

from .accountant import PrivacyLedger, RoundPlan, calibrate_noise, plan_history, round_cost
from .trainer import DPSettings, RoundStats, dp_loss_report, train_round

__all__ = [
    "DPSettings",
    "PrivacyLedger",
    "RoundPlan",
    "RoundStats",
    "calibrate_noise",
    "dp_loss_report",
    "plan_history",
    "round_cost",
    "train_round",
]
