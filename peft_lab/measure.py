"""Measurement: parameter counts in PEFT's format, the memory of a training step by tensor accounting, timing.
The analytic calculator that predicts the memory from sizes alone lives in :mod:`peft_lab.estimate`.

Notebook 00 ("The memory arithmetic of full fine-tuning") and every method notebook's "Measure" section.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch

from . import validate


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` numbers of parameters; tied weights are counted once, as PEFT does."""
    validate.require_module("model", model)
    trainable = total = 0
    for p in model.parameters():  # parameters() yields each shared tensor once
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: torch.nn.Module) -> None:
    """Print the line PEFT's ``print_trainable_parameters`` prints, character for character."""
    t, a = count_parameters(model)
    if a == 0:
        raise ValueError(f"model has no parameters ({validate.describe(model)}), so there is no trainable% to print")
    print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")


# ---------------------------------------------------------------------------------------------------------
# Memory of one training step (notebook 00, "The memory arithmetic of full fine-tuning")
# ---------------------------------------------------------------------------------------------------------

MEMORY_KEYS = ("parameters", "gradients", "optimizer", "activations")


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def _check_batch(batch, model: torch.nn.Module | None = None) -> None:
    """A batch as :func:`peft_lab.collate` makes it: integer ``input_ids`` (batch × length) the model can
    embed, and ``attention_mask`` / ``labels``, when present, tensors of exactly that shape."""
    if not isinstance(batch, Mapping) or not batch:
        kind = TypeError if not isinstance(batch, Mapping) else ValueError  # a wrong kind, or an empty dict
        raise kind(f"batch is empty or not a dict (got {validate.describe(batch)}): pass a dict with at least "
                   "input_ids (and usually attention_mask, labels), e.g. peft_lab.collate(examples, pad_id)")
    if "input_ids" not in batch:
        raise ValueError(f"batch has no 'input_ids' (keys: {sorted(batch)})")
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"batch['input_ids'] must be a tensor, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"batch['input_ids'] must hold integer token ids, got dtype {ids.dtype}")
    if ids.numel() == 0:
        raise ValueError("batch['input_ids'] is empty (no tokens)")
    if ids.ndim != 2:
        raise ValueError(f"batch['input_ids'] must be 2-d (batch × sequence), got shape {tuple(ids.shape)}; "
                         "for one sequence use ids.unsqueeze(0)")
    for key in ("attention_mask", "labels"):
        if key in batch:
            other = batch[key]
            if not isinstance(other, torch.Tensor) or tuple(other.shape) != tuple(ids.shape):
                raise ValueError(f"batch[{key!r}] must be a tensor of the shape of batch['input_ids'] "
                                 f"{tuple(ids.shape)}, got {validate.describe(other)}; otherwise another computation "
                                 "than the one asked for would be measured")
    if model is not None:
        validate.require_token_ids("batch['input_ids']", ids, model)


def measure_memory(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Bytes needed by ONE AdamW training step of ``model`` on ``batch``, by tensor accounting.

    Returns ``{"parameters", "gradients", "optimizer", "activations", "total"}`` (bytes, ints), plus
    ``"cuda_peak"`` when the model lives on a CUDA device. Notebook 00, "Measuring a training step".

    How each part is counted (valid on any device, CPU included):

    * ``parameters``: every parameter's ``numel * element_size`` (tied weights once), plus the buffers of
      NF4 layers (a QLoRA base, notebook 05), which hold those layers' weights.
    * ``gradients``: the same for the trainable parameters only: ``.grad`` has the parameter's dtype.
    * ``optimizer``: AdamW keeps ``exp_avg`` and ``exp_avg_sq`` per trainable parameter, in the parameter's
      dtype, so twice the gradient bytes (the scalar ``step`` counter is ignored).
    * ``activations``: one forward pass runs under ``torch.autograd.graph.saved_tensors_hooks``; every tensor
      autograd saves for the backward pass goes through the pack hook. Each *storage* is counted once, at its
      full size (a view keeps its whole storage alive), and storages that belong to parameters are left out
      (autograd saves weights too, but they are already counted). Integer tensors the graph keeps (token ids,
      targets) are included; they are small.

    Assumptions and what this leaves out: it counts what is *live at the end of the forward pass* — the
    usual peak of a step — not the allocator's view. Temporary buffers inside kernels, intermediate results
    freed during the forward, the logits returned to the caller when autograd did not save them, CUDA
    context and caching-allocator overhead and fragmentation are not included. The total is also a slight
    *over*-estimate of a real peak: during backward activations are freed while gradients appear, and
    AdamW's state is created after backward in the first step. It describes the model as given: in train
    mode, without gradient checkpointing, at its current dtype (no autocast).

    On CUDA a real step is run as well: two AdamW steps with ``lr=0`` (the weights do not move), and
    ``torch.cuda.max_memory_allocated`` during the second one — the steady state, with optimizer state,
    activations and gradients live together — is reported as ``"cuda_peak"`` (it also counts anything else
    already allocated on that GPU).

    The model's weights are not changed: forward and backward run, no update is applied; gradients are
    restored to what they were before the call (usually ``None``), the train/eval mode too, and the random
    number generator state is forked so dropout draws do not disturb the caller.
    """
    validate.require_module("model", model)
    _check_batch(batch)
    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters")
    device = params[0].device
    if device.type == "meta":
        raise ValueError("a model on the meta device has no data to run; use estimate_memory for its size")
    _check_batch(batch, model)
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    trainable = [p for p in params if p.requires_grad]

    stored = params + _quantized_weights(model)
    out = {"parameters": sum(t.numel() * t.element_size() for t in stored)}
    out["gradients"] = sum(p.numel() * p.element_size() for p in trainable)
    out["optimizer"] = 2 * out["gradients"]

    param_storages = {_storage_key(t) for t in stored}
    saved: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in param_storages and key not in saved:
            saved[key] = t.untyped_storage().nbytes()
        return t

    was_training = model.training
    old_grads = [p.grad for p in params]
    devices = [device] if device.type == "cuda" else []
    try:
        model.train()
        with torch.random.fork_rng(devices=devices):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = _loss(model, batch)
            if loss.requires_grad:  # with every parameter frozen there is no graph and nothing to save
                loss.backward()
            del loss
            out["activations"] = sum(saved.values())
            out["total"] = sum(out[k] for k in MEMORY_KEYS)
            if device.type == "cuda" and trainable:
                out["cuda_peak"] = _cuda_peak(model, batch, trainable)
    finally:
        for p, g in zip(params, old_grads):
            p.grad = g
        model.train(was_training)
    return out


def _quantized_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors in which layers store their weights outside parameters (NF4 codes and constants, notebook
    06), as each such layer reports them (:class:`peft_lab.core.StoredWeights`): counted with the parameters."""
    from .core import StoredWeights
    return [t for m in model.modules() if isinstance(m, StoredWeights) for t in m.stored_tensors()]


def _loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if "labels" not in batch:
        batch = {**batch, "labels": batch["input_ids"]}
    return model(**batch).loss


def _cuda_peak(model, batch, trainable) -> int:
    for p in trainable:
        p.grad = None
    opt = torch.optim.AdamW(trainable, lr=0.0, weight_decay=0.0)  # lr=0: p - 0 * update == p exactly
    try:
        for step in range(2):
            opt.zero_grad(set_to_none=True)
            if step == 1:  # the steady-state step: optimizer state already exists
                torch.cuda.synchronize(trainable[0].device)
                torch.cuda.reset_peak_memory_stats(trainable[0].device)
            _loss(model, batch).backward()
            opt.step()
        torch.cuda.synchronize(trainable[0].device)
        return int(torch.cuda.max_memory_allocated(trainable[0].device))
    finally:
        opt.zero_grad(set_to_none=True)
        opt.state.clear()
        del opt
        torch.cuda.empty_cache()


def interleaved_times(fns: Mapping[str, Callable[[], object]], repeats: int = 7,
                      warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each function: ``warmup`` untimed rounds, then ``repeats`` timed rounds with the
    order reversed every other round (A B, B A, A B, ...), so neither always runs first after the other. Entry
    ``i`` of every list comes from round ``i``. The one timer of the package (:func:`time_fn`, the benchmarks).

    CUDA work is asynchronous: when CUDA is in use the device is synchronised before each clock read. Whether
    it is in use is decided *after* the warm-up, so a function that is the first to touch CUDA is timed with
    its kernels, not their launches."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()

    def sync():
        if cuda:
            torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def time_fn(fn, repeats: int = 5, warmup: int = 1):
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls.

    ``fn`` may also be a dict of callables (``{"base": f, "merged": g}``): then each round calls every one once,
    in turn, and a dict of medians comes back. Comparisons should be timed that way: a busy moment of the
    machine (another process, a frequency change) then hits every variant alike instead of one of them, and
    the warm-up rounds take the first call's one-off costs (memory allocation, kernel selection) out of every
    variant. The median ignores the odd slow round. Rounds and CUDA synchronisation as in
    :func:`interleaved_times`. Used by the "Measure" sections of the method notebooks.
    """
    single = not isinstance(fn, dict)
    fns = {"fn": fn} if single else dict(fn)
    if not fns:
        raise ValueError("fn is an empty dict: pass a callable, or a dict of callables to time in alternation")
    for name, f in fns.items():
        validate.require_callable("fn" if single else f"fn[{name!r}]", f)
    times = interleaved_times(fns, validate.require_int("repeats", repeats, min=1),
                              validate.require_int("warmup", warmup, min=0))
    medians = {name: statistics.median(t) for name, t in times.items()}
    return medians["fn"] if single else medians
