"""Checks of optimizer hyperparameters: a bad value fails at construction, naming the argument."""

from __future__ import annotations


def check_hyperparameters(optimizer: str, lr=None, betas=None, eps=None, weight_decay=None, **positive) -> None:
    """Raise ``ValueError`` naming the first bad argument. ``positive``: other arguments that must be > 0."""
    def bad(name, value, rule):
        raise ValueError(f"{optimizer}: invalid {name}={value!r} ({rule})")

    if lr is not None and not lr >= 0:          # `not >=` also catches NaN
        bad("lr", lr, "the learning rate must be >= 0")
    if betas is not None:
        if len(betas) != 2:
            bad("betas", betas, "two coefficients, (beta1, beta2)")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                bad(f"betas[{i}]", beta, "each beta must be in [0, 1)")
    if eps is not None and not eps >= 0:
        bad("eps", eps, "must be >= 0")
    if weight_decay is not None and not weight_decay >= 0:
        bad("weight_decay", weight_decay, "must be >= 0")
    for name, value in positive.items():
        if value is not None and not value > 0:
            bad(name, value, "must be > 0")
