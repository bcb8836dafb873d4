"""Measurement: parameter counts in PEFT's format, memory of a training step, timing.

Notebook 00 ("The memory arithmetic of full fine-tuning") and every method notebook's "Measure" section.
"""
from __future__ import annotations

import torch


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameters; tied weights are counted once, as PEFT does."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    trainable = total = 0
    for p in model.parameters():  # parameters() yields each shared tensor once
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: torch.nn.Module) -> None:
    """Print the line PEFT's ``print_trainable_parameters`` prints, character for character."""
    t, a = count_parameters(model)
    print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")
