"""The head-to-head comparison of notebook 06: every method of the course on one task, one budget.

A :class:`MethodSpec` says how to put a method on a fresh copy of the base model, which learning rates to
try, and how the memory calculator describes it. :func:`run` trains and scores one (method, learning rate,
seed); :func:`switched_off` gives the base model back for the forgetting measurement; :func:`calculator`
and :func:`measured` give the memory of one training step at real sizes. The methods live in their own
modules (notebooks 02–04) or in PEFT; this module only calls them, so the comparison runs the very code the
method notebooks teach and test.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import torch
from torch import nn

from . import registry
from .data import evaluate_task, perplexity
from .estimate import estimate_memory
from .measure import count_parameters, measure_memory
from .train import History, train

__all__ = ["MethodSpec", "Run", "METHODS", "run", "switched_off", "forgetting", "steps_to_reach",
           "spread", "trainable_count", "stored_count", "calculator", "has_precision", "measured", "CALCULATOR_METHODS",
           "answer_loss", "pick_lr"]

BOTTLENECK, PREFIX_TOKENS, PROMPT_TOKENS, PROJECTION = 16, 10, 10, 64  # sizes used throughout notebook 06


@dataclass(frozen=True)
class MethodSpec:
    """One method: ``apply(model, tokenizer) -> model`` on a fresh copy of the base (it may return a wrapper),
    the learning rates of the grid, where it comes from, and what :func:`estimate_memory` is told about it
    (``memory``: the method's config, e.g. ``LoRAConfig(8, 16)``, or a calculator spec; ``None`` when the
    calculator has no formula for it)."""

    label: str
    apply: Callable[[nn.Module, object], nn.Module]
    lr_grid: tuple[float, ...]
    source: str                                   # "peft_lab" or "PEFT"
    memory: object = None
    method: str | None = None                      # its registry name (peft_lab.registry); None: full FT
    precisions: tuple[str, ...] | None = None     # the calculator's precisions it exists at (None: all)
    quantized_base: bool = False                   # QLoRA: switched off, it is the NF4 base, not the base

    @property
    def can_switch_off(self) -> bool:
        """Whether the trained model can give its base model back (full fine-tuning changed the base itself)."""
        return self.method is not None

def _lora_config(rank: int, use_dora: bool = False):
    """LoRA (or DoRA) of rank r with α = 2r on the architecture's default targets (PEFT's table)."""
    from .lora import LoRAConfig
    return LoRAConfig(rank, 2 * rank, use_dora=use_dora)


def _lora(rank: int, use_dora: bool = False, nf4_base: bool = False):
    def apply(model, tok):
        from .lora import apply_lora
        # QLoRA (notebook 05): the frozen base in NF4, LoRA on top. A model on the meta device (parameter
        # counts, trainable_count) has no values to quantize, and LoRA's count does not depend on them.
        if nf4_base and next(model.parameters()).device.type != "meta":
            from .qlora import quantize_model
            quantize_model(model)
        return apply_lora(model, config=_lora_config(rank, use_dora))
    return apply


def _ia3(model, tok):
    from .ia3 import apply_ia3
    return apply_ia3(model)  # PEFT's defaults for the architecture (notebook 05)


def _adapters(placement: str):
    def apply(model, tok):
        from .adapters import apply_adapters
        return apply_adapters(model, placement=placement, bottleneck_dim=BOTTLENECK)
    return apply


def _prefix(model, tok):
    from .prefix import apply_prefix_tuning
    return apply_prefix_tuning(model, num_virtual_tokens=PREFIX_TOKENS, projection_dim=PROJECTION)


def _prompt(model, tok):
    from .prefix import apply_prompt_tuning
    return apply_prompt_tuning(model, num_virtual_tokens=PROMPT_TOKENS, init="random")


def _peft(kind: str):
    def apply(model, tok):
        import peft
        config = (peft.LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM") if kind == "lora"
                  else peft.IA3Config(task_type="CAUSAL_LM"))
        return peft.get_peft_model(model, config)
    return apply


def _ia3_config():
    from .ia3 import IA3Config
    return IA3Config()  # PEFT's default targets and feed-forward modules for the architecture


#: Name → spec, in the order of the course. Learning-rate grids are a factor ~3 apart around what notebooks
#: 01–04 and short probes on notebook 06's task found (prompt tuning needs the largest rates, as in Lester et
#: al. 2021); the notebook reports the grid and flags a best rate at an edge of it.
METHODS: dict[str, MethodSpec] = {
    "full FT": MethodSpec("full FT", lambda m, t: m, (1e-4, 3e-4, 1e-3), "peft_lab", {"kind": "full"}),
    "LoRA r=1": MethodSpec("LoRA r=1", _lora(1), (3e-3, 1e-2, 3e-2), "peft_lab", _lora_config(1), "lora"),
    "LoRA r=8": MethodSpec("LoRA r=8", _lora(8), (3e-3, 1e-2, 3e-2), "peft_lab", _lora_config(8), "lora"),
    "Houlsby": MethodSpec("Houlsby", _adapters("houlsby"), (3e-3, 1e-2, 3e-2), "peft_lab",
                          {"kind": "houlsby", "bottleneck_dim": BOTTLENECK}, "bottleneck"),
    "Pfeiffer": MethodSpec("Pfeiffer", _adapters("pfeiffer"), (3e-3, 1e-2, 3e-2), "peft_lab",
                           {"kind": "pfeiffer", "bottleneck_dim": BOTTLENECK}, "bottleneck"),
    "prefix": MethodSpec("prefix", _prefix, (3e-3, 1e-2, 3e-2), "peft_lab",
                         {"kind": "prefix", "num_virtual_tokens": PREFIX_TOKENS, "projection_dim": PROJECTION},
                         "prefix_tuning"),
    "prompt": MethodSpec("prompt", _prompt, (3e-2, 1e-1, 3e-1), "peft_lab",
                         {"kind": "prompt", "num_virtual_tokens": PROMPT_TOKENS}, "prompt_tuning"),
    "IA3": MethodSpec("IA3", _ia3, (3e-2, 1e-1, 3e-1), "peft_lab", _ia3_config(), "ia3"),
    "DoRA r=8": MethodSpec("DoRA r=8", _lora(8, use_dora=True), (3e-3, 1e-2, 3e-2), "peft_lab",
                           _lora_config(8, use_dora=True), "lora"),
    "QLoRA r=8": MethodSpec("QLoRA r=8", _lora(8, nf4_base=True), (3e-3, 1e-2, 3e-2), "peft_lab",
                            _lora_config(8), "lora", precisions=("4bit-base",), quantized_base=True),
    "PEFT LoRA r=8": MethodSpec("PEFT LoRA r=8", _peft("lora"), (3e-3, 1e-2, 3e-2), "PEFT", _lora_config(8),
                                "lora"),
    "PEFT IA3": MethodSpec("PEFT IA3", _peft("ia3"), (3e-2, 1e-1, 3e-1), "PEFT", _ia3_config(), "ia3"),
}
#: The methods the analytic calculator describes (ours; PEFT's rows are the same computations).
CALCULATOR_METHODS = [name for name, spec in METHODS.items() if spec.memory is not None
                      and spec.source == "peft_lab"]


@dataclass
class Run:
    """What one training run of one method measured."""

    method: str
    lr: float
    seed: int
    history: History
    accuracy: float
    trainable: int
    total: int
    model: nn.Module | None = field(default=None, repr=False)


def run(name: str, base: nn.Module, tokenizer, train_examples: list[dict], val_examples: list[dict], *,
        lr: float, seed: int = 0, steps: int = 200, batch_size: int = 16, eval_every: int = 25,
        schedule: str = "cosine", keep_model: bool = False) -> Run:
    """Train method ``name`` on a deep copy of ``base`` (``base`` is never changed) and score it on
    ``val_examples`` every ``eval_every`` steps. Same data order, batch and schedule for every method: only
    the method, its learning rate and the seed differ."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {list(METHODS)}")
    torch.manual_seed(seed)  # the method's own random init (LoRA's A, adapters, prefixes) follows the seed
    model = METHODS[name].apply(copy.deepcopy(base), tokenizer)
    trainable, total = count_parameters(model)
    acc = lambda m: evaluate_task(m, tokenizer, val_examples)["accuracy"]  # noqa: E731
    hist = train(model, train_examples, steps=steps, batch_size=batch_size, lr=lr, schedule=schedule,
                 eval_fn=acc, eval_every=eval_every, seed=seed, pad_id=tokenizer.eos_token_id,
                 desc=f"{name} lr={lr:g} seed={seed}")
    return Run(name, lr, seed, hist, hist.final_metric, trainable, total, model if keep_model else None)


@contextmanager
def switched_off(model: nn.Module):
    """Inside the block ``model`` computes its base model alone, whatever method it carries.

    peft_lab's methods switch off through the ``disable`` of their registry entry (:mod:`peft_lab.registry`),
    PEFT's models through ``disable_adapter()``. A fully fine-tuned model has nothing to switch off: ``ValueError``.
    """
    if hasattr(model, "peft_config") and hasattr(model, "disable_adapter"):
        ctx = model.disable_adapter()
    else:
        found = registry.methods_on(model)
        if not found:
            raise ValueError("this model carries no adapter to switch off (full fine-tuning changes the base "
                             "itself)")
        ctx = registry.method_on(model).disable(model)
    with ctx:
        yield model


def forgetting(model: nn.Module, tokenizer, texts: list[str]) -> dict[str, float]:
    """Held-out perplexity with the method on, and switched off (``nan`` where it cannot be)."""
    out = {"on": perplexity(model, tokenizer, texts), "off": float("nan")}
    try:
        with switched_off(model):
            out["off"] = perplexity(model, tokenizer, texts)
    except ValueError:
        pass
    return out


def steps_to_reach(history: History, target: float) -> int | None:
    """The first evaluated step at which the metric reached ``target``, or ``None`` if it never did."""
    return next((step for step, value in zip(history.eval_step, history.metric) if value >= target), None)


def spread(values) -> tuple[float, float, float]:
    """``(mean, min, max)`` of the seeds' values; the plots draw min–max as the error bar."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("spread needs at least one value")
    return sum(values) / len(values), min(values), max(values)


# ----------------------------------------------------------------------------------------------------------
# Memory at real sizes
# ----------------------------------------------------------------------------------------------------------

def trainable_count(name: str, arch) -> int:
    """The method's trainable parameters on architecture ``arch`` (a name of ``build_from_config`` or a
    config), counted by applying the method itself to the model built on the meta device (nothing allocated);
    named architectures are counted once per session."""
    return _trainable_on_named(name, arch) if isinstance(arch, str) else _count_trainable(name, arch)


def _count_trainable(name: str, arch) -> int:
    from .models import build_from_config
    return count_parameters(METHODS[name].apply(build_from_config(arch, device="meta"), None))[0]


_trainable_on_named = lru_cache(maxsize=None)(_count_trainable)


def stored_count(name: str, arch) -> int:
    """Parameters a task's file holds after training: what the method trains, except prefix tuning, whose
    projection folds away into its P keys and values per layer (notebook 04): 2 · L · P · kv_dim."""
    if name != "prefix":
        return trainable_count(name, arch)
    from .models import architecture_config
    from .prefix import prefix_shapes
    s = prefix_shapes(architecture_config(arch) if isinstance(arch, str) else arch)
    return 2 * s["num_layers"] * PREFIX_TOKENS * s["kv_dim"]


def calculator(name: str, arch, batch_size: int = 1, seq_len: int = 128, precision: str = "fp32") -> dict:
    """:func:`estimate_memory` for method ``name`` on ``arch``: bytes of parameters, gradients, optimizer
    state and activations of one AdamW step."""
    spec = METHODS[name]
    if spec.memory is None:
        raise ValueError(f"the calculator has no formula for {name!r}; known: {CALCULATOR_METHODS}")
    if not has_precision(name, precision):
        why = (f"it exists only at precision {' or '.join(map(repr, spec.precisions))} (its frozen base is "
               "stored that way)" if spec.precisions else "there is no frozen base to store in 4 bits")
        raise ValueError(f"no {precision!r} figure for {name}: {why}")
    trainable = None if name == "full FT" else trainable_count(name, arch)
    return estimate_memory(arch, trainable_params=trainable, batch_size=batch_size, seq_len=seq_len,
                           precision=precision, method=spec.memory)


def has_precision(name: str, precision: str) -> bool:
    """Whether method ``name`` exists at the calculator's ``precision``: full fine-tuning has no frozen base to
    store in 4 bits, and QLoRA's base is always NF4 (``"4bit-base"``)."""
    spec = METHODS[name]
    if spec.precisions is not None:
        return precision in spec.precisions
    return not (precision == "4bit-base" and name == "full FT")


def measured(name: str, base: nn.Module, batch: dict) -> dict:
    """:func:`measure_memory` of one training step of method ``name`` on a deep copy of ``base``."""
    model = METHODS[name].apply(copy.deepcopy(base), None)
    return measure_memory(model, batch)


def ready_for_inference(name: str, model: nn.Module) -> nn.Module:
    """A copy of the trained ``model`` of method ``name`` in the form it would be served (notebook 06 §7), in
    eval mode: LoRA merged into its weights (02.7), PEFT's methods merged and unloaded, the prefix's
    reparameterization folded into a plain prefix (notebook 04), IA3's vectors folded into its weights
    (05.3); adapters, prompts and QLoRA (whose NF4 base cannot take a float update, notebook 05 §3) stay as trained."""
    model = copy.deepcopy(model)
    spec = METHODS[name]
    if spec.source == "PEFT":
        model = model.merge_and_unload()
    elif served_as(name) != "as trained":
        registry.get(spec.method).serve(model)
    return model.eval()


def served_as(name: str) -> str:
    """How :func:`ready_for_inference` serves method ``name``, as its registry entry says: ``"merged"``,
    ``"projection folded"`` or ``"as trained"`` (full fine-tuning; a method on a quantized base, which cannot
    take a float update)."""
    spec = METHODS[name]
    if spec.method is None or spec.quantized_base:
        return "as trained"
    return "merged" if spec.source == "PEFT" else registry.get(spec.method).served_as


# ----------------------------------------------------------------------------------------------------------
# Choosing a learning rate on a criterion that a near-tie in accuracy cannot flip (notebook 06, section 3)
# ----------------------------------------------------------------------------------------------------------

def answer_loss(model: nn.Module, tokenizer, examples: list[dict], batch_size: int = 64) -> float:
    """Mean cross-entropy (nats, over the whole vocabulary) of the answer token after each prompt: the
    training loss restricted to the token that carries the verdict. Unlike accuracy it moves continuously, so
    two learning rates a few reviews apart in accuracy are still ordered by how sure they are. (One number of
    :func:`peft_lab.diagnose.answer_diagnostics`, which notebook 04 reads in full.)"""
    from .diagnose import answer_diagnostics
    return answer_diagnostics(model, tokenizer, examples, batch_size=batch_size)["answer_loss"]


def pick_lr(losses: dict[float, float]) -> tuple[float, bool]:
    """The learning rate of lowest validation loss, and whether it sits at an edge of the rates tried."""
    best = min(losses, key=losses.get)
    return best, best in (min(losses), max(losses))
