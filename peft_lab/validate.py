"""Argument checks at the package's boundary: one place, one message style.

Every public function of ``peft_lab`` checks what it receives with the helpers below before doing anything, so
that a mistake gives one clear error instead of a silent wrong result or a traceback from deep inside torch. Each
helper takes the argument's ``name`` as the caller writes it (``"lr"``, ``"examples"``,
``"batch['attention_mask']"``) and the ``value`` received, and either returns the value in a plain form or raises
``TypeError`` (wrong kind of thing) / ``ValueError`` (right kind, wrong value) / :class:`MissingField` (a row
lacks a field: a ``ValueError`` that is also a ``KeyError``, printed without quotes) whose message names the
argument, shows the value received, says what was expected and how to fix it.

Numbers are accepted in every form a notebook produces — Python ``int``/``float``, numpy scalars
(``np.int64``, ``np.float32``), 0-d numpy arrays and 0-d torch tensors — and returned as Python ``int`` or
``float``, so that whatever is stored from them (configs, ``adapter_config.json``, results) serialises as
JSON. ``bool`` is never a number here, and neither is a string such as ``"1e-3"``.

Helpers (all return the checked value):

* :func:`require_int` ``(name, value, *, min=None, max=None)`` → ``int`` (``2.0`` is refused: pass ``2``)
* :func:`require_real` ``(name, value, *, min=None, max=None, min_open=False, max_open=False)`` → ``float``,
  finite
* :func:`require_bool`, :func:`require_str` ``(..., choices=None)``, :func:`require_callable`
* :func:`optional` ``(check, name, value, **kw)`` → ``None`` or ``check(name, value, **kw)``
* :func:`require_module` → an ``nn.Module`` (a ``(model, tokenizer)`` tuple gets the hint to unpack it)
* :func:`require_tokenizer` → a Hugging Face tokenizer
* :func:`require_path` ``(name, value)`` → ``Path`` with ``~`` expanded; refuses ``""``
* :func:`require_mapping` ``(name, value, *, nonempty=True)``
* :func:`require_texts` ``(name, value)`` → ``list[str]``; refuses a bare ``str``
* :func:`require_task_rows` ``(name, value)`` → raw task rows ``{"prompt", "answer"}`` (not encoded ones)
* :func:`require_encoded_examples` ``(name, value, *, vocab_size=None, context=None, supervised=False)``
  → ``{"input_ids", "labels"}`` rows with ids in the vocabulary and lengths within the context
* :func:`model_limits` ``(model)`` → ``(vocab_size, context_length)`` (either may be ``None``)
* :func:`require_token_ids` ``(name, ids, model)`` → an integer tensor of ids the model can embed
* :func:`describe` ``(value)`` → the short "what was received" text the messages use
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["describe", "as_python_number", "require_int", "require_real", "require_bool", "require_str",
           "require_callable", "optional", "require_module", "require_tokenizer", "require_path",
           "require_mapping", "require_texts", "require_task_rows", "require_encoded_examples",
           "model_limits", "require_token_ids"]

class MissingField(ValueError, KeyError):
    """A row lacks a field. A ``ValueError`` like every other wrong value, and a ``KeyError`` for code that
    catches that; printed as a sentence (``KeyError`` alone would print its message in quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


IGNORE_INDEX = -100  # the label that masks a position out of the loss (transformers' convention)


def describe(value: Any) -> str:
    """``repr`` cut to 60 characters plus the type, or the shape for tensors/arrays and the length for
    sequences: what an error message shows of the value received."""
    if isinstance(value, torch.Tensor) or (hasattr(value, "shape") and hasattr(value, "dtype")):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, nn.Module):
        return f"a {type(value).__name__} module"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, (list, tuple)) and len(value) > 3:
        return f"{text} ({type(value).__name__} of {len(value)} items)"
    return f"{text} ({type(value).__name__})"


def _fail(error: type, name: str, value: Any, expected: str, fix: str = "") -> None:
    message = f"{name} must be {expected}, got {describe(value)}"
    raise error(message + (f". {fix}" if fix else ""))


def as_python_number(value: Any, one_element: bool = False) -> Any:
    """A numpy or torch scalar (or 0-d array/tensor) as a Python ``int``/``float``/``bool``; anything else
    unchanged. Used where a number is expected, before the ``isinstance`` checks. ``one_element=True`` also
    unpacks an array or tensor holding exactly one number (an exercise's answer ``np.array([4.0])``)."""
    if type(value) in (bool, int, float):  # exact types: np.float64 subclasses float and is converted below
        return value
    if isinstance(value, torch.Tensor) or (hasattr(value, "ndim") and hasattr(value, "item")):
        count = value.numel() if isinstance(value, torch.Tensor) else getattr(value, "size", None)
        if getattr(value, "ndim", None) == 0 or (one_element and count == 1):
            item = value.item()
            return item if isinstance(item, (bool, int, float)) else value
        return value
    if isinstance(value, numbers.Integral):  # numpy integers
        return int(value)
    if isinstance(value, numbers.Real):  # numpy floats
        return float(value)
    return value


def _bounds(name: str, value, lo, hi, lo_open: bool, hi_open: bool, kind: str) -> None:
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and (value >= hi if hi_open else value > hi)
    if too_low or too_high:
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {lo:g}")
        if hi is not None:
            parts.append(f"{'<' if hi_open else '<='} {hi:g}")
        raise ValueError(f"{name} must be {kind} {' and '.join(parts)}, got {value!r}")


def _string_hint(name: str, value: Any) -> str:
    if isinstance(value, str):
        return f"write the number without quotes, e.g. {name}={value.strip()}" if _parses(value) else ""
    return ""


def _parses(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def require_int(name: str, value: Any, *, min: int | None = None, max: int | None = None) -> int:
    """An integer (Python, numpy or 0-d tensor) within ``[min, max]``, returned as a Python ``int``."""
    v = as_python_number(value)
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and math.isfinite(v):
            fix = (f"pass {int(v)}" if v.is_integer()
                   else f"counts are whole numbers: pass {math.floor(v)} or {math.ceil(v)}")
        else:
            fix = _string_hint(name, value)
        _fail(TypeError, name, value, "an integer", fix)
    _bounds(name, v, min, max, False, False, "an integer")
    return v


def require_real(name: str, value: Any, *, min: float | None = None, max: float | None = None,
                 min_open: bool = False, max_open: bool = False) -> float:
    """A finite real number (Python, numpy or 0-d tensor) within the bounds, returned as a Python ``float``.
    ``min_open=True`` excludes ``min`` itself (``lr > 0``)."""
    v = as_python_number(value)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        _fail(TypeError, name, value, "a number", _string_hint(name, value))
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    _bounds(name, v, min, max, min_open, max_open, "a number")
    return v


def require_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` (numpy/torch booleans too); ``"yes"``, ``1`` and ``None`` are refused."""
    v = as_python_number(value)
    if not isinstance(v, bool):
        _fail(TypeError, name, value, "True or False")
    return v


def require_str(name: str, value: Any, *, choices=None, nonempty: bool = True) -> str:
    """A string, non-empty unless ``nonempty=False``, one of ``choices`` when given."""
    if not isinstance(value, str):
        _fail(TypeError, name, value, "a string" + (f", one of {list(choices)}" if choices else ""))
    if nonempty and not value:
        _fail(ValueError, name, value, "a non-empty string")
    if choices is not None and value not in choices:
        _fail(ValueError, name, value, f"one of {list(choices)}")
    return value


def require_callable(name: str, value: Any) -> Callable:
    if not callable(value):
        _fail(TypeError, name, value, "a function", f"pass the function itself, e.g. {name}=my_fn (no call)")
    return value


def optional(check: Callable, name: str, value: Any, **kwargs):
    """``None`` passes through; anything else goes through ``check``."""
    return None if value is None else check(name, value, **kwargs)


def require_module(name: str, value: Any) -> nn.Module:
    """A ``torch.nn.Module``; a ``(model, tokenizer)`` pair gets the hint to unpack it."""
    if isinstance(value, nn.Module):
        return value
    fix = ""
    if isinstance(value, tuple) and value and isinstance(value[0], nn.Module):
        fix = "load_base_model returns (model, tokenizer): unpack it, model, tok = load_base_model(...)"
    elif isinstance(value, str):
        fix = f'load the model first: {name}, tok = peft_lab.load_base_model({value!r})'
    _fail(TypeError, name, value, "a torch.nn.Module (the model)", fix)


def require_tokenizer(name: str, value: Any):
    """A Hugging Face tokenizer (something with ``encode`` and ``eos_token_id``)."""
    if not callable(getattr(value, "encode", None)) or not hasattr(value, "eos_token_id"):
        fix = "pass the tokenizer that load_base_model returned with the model"
        if isinstance(value, nn.Module):
            fix = "the arguments are (model, tokenizer, ...): " + fix
        _fail(TypeError, name, value, "a Hugging Face tokenizer", fix)
    return value


def require_path(name: str, value: Any) -> Path:
    """A ``str`` or ``os.PathLike`` naming a file or folder; ``~`` is expanded; ``""`` is refused (it would
    silently mean the current working directory)."""
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        _fail(TypeError, name, value, "a path (str or pathlib.Path)")
    if not str(value).strip():
        _fail(ValueError, name, value, "a non-empty path", 'name a folder, e.g. "adapters/lora"; '
              'for the current directory say "." explicitly')
    return Path(value).expanduser()


def require_mapping(name: str, value: Any, *, nonempty: bool = True, fix: str = "") -> Mapping:
    if not isinstance(value, Mapping):
        _fail(TypeError, name, value, "a dict", fix)
    if nonempty and not value:
        _fail(ValueError, name, value, "a non-empty dict", fix)
    return value


def _require_list(name: str, value: Any, what: str, fix: str) -> list:
    if isinstance(value, (str, bytes)):
        _fail(TypeError, name, value, f"a list of {what}",
              "a single string is a sequence of characters, each of which would be taken as one item; "
              f"wrap it in a list: [{name}]" if isinstance(value, str) else fix)
    if isinstance(value, Mapping):
        _fail(TypeError, name, value, f"a list of {what}", f"for a single one, wrap it in a list: [{name}]")
    if isinstance(value, torch.Tensor) or not hasattr(value, "__iter__"):
        _fail(TypeError, name, value, f"a list of {what}", fix)
    return list(value)


def require_texts(name: str, value: Any, *, nonempty: bool = True) -> list[str]:
    """A list (or tuple, or other iterable) of strings, never a bare ``str``."""
    items = _require_list(name, value, "strings (texts)", "")
    if nonempty and not items:
        _fail(ValueError, name, value, "a non-empty list of texts")
    for i, t in enumerate(items):
        if not isinstance(t, str):
            fix = ""
            if isinstance(t, Mapping) and "prompt" in t:
                fix = "these are task rows; for texts pass e.g. [r['prompt'] + ' ' + r['answer'] for r in rows]"
            _fail(TypeError, f"{name}[{i}]", t, "a string", fix)
    return items


def require_task_rows(name: str, value: Any, *, nonempty: bool = True) -> list[Mapping]:
    """Raw task rows ``{"prompt": str, "answer": str}`` as :func:`peft_lab.data.load_task` returns them."""
    rows = _require_list(name, value, 'task rows {"prompt", "answer"}', "pass the rows from load_task(...)")
    if nonempty and not rows:
        _fail(ValueError, name, value, "a non-empty list of task rows")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            _fail(TypeError, f"{name}[{i}]", row, 'a task row {"prompt": ..., "answer": ...}',
                  "pass the rows from load_task(...)")
        missing = [k for k in ("prompt", "answer") if k not in row]
        if missing:
            fix = ("these are encoded examples (token ids); pass the raw rows from load_task(...) instead"
                   if "input_ids" in row else "each row needs 'prompt' and 'answer' (see load_task)")
            raise MissingField(f"{name}[{i}] has no {missing} field (keys: {sorted(row)}); {fix}")
        for k in ("prompt", "answer"):
            if not isinstance(row[k], str):
                _fail(TypeError, f"{name}[{i}][{k!r}]", row[k], "a string")
    return rows


def _int_list(name: str, value: Any) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.ndim != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            _fail(TypeError, name, value, "a 1-d list or tensor of integer token ids")
        return value.tolist()
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        _fail(TypeError, name, value, "a list of integer token ids")
    items = list(value)
    for j, t in enumerate(items):
        t = as_python_number(t)
        if isinstance(t, bool) or not isinstance(t, int):
            _fail(TypeError, f"{name}[{j}]", t, "an integer token id")
    return [int(as_python_number(t)) for t in items]


def require_encoded_examples(name: str, value: Any, *, vocab_size: int | None = None,
                             context: int | None = None, supervised: bool = False) -> list[Mapping]:
    """Encoded examples ``{"input_ids": [...], "labels": [...]}`` (``labels`` optional, default the ids),
    as :func:`peft_lab.data.encode_task` / ``encode_texts`` return them.

    Checks every id is in ``[0, vocab_size)``, every length is ``<= context``, labels have the ids' length
    and hold ``-100`` or a token id. ``supervised=True`` also requires each example to have at least one
    label after the first position that is not ``-100`` (a causal LM predicts token t from tokens < t, so
    the first label never counts): an example without one gives a 0/0 = NaN loss when a batch holds only such
    examples.
    """
    rows = _require_list(name, value, 'encoded examples {"input_ids", "labels"}',
                         "encode the rows first: encode_task(rows, tokenizer) or encode_texts(texts, tokenizer)")
    if not rows:
        _fail(ValueError, name, value, "a non-empty list of encoded examples")
    if isinstance(value, tuple) and value and isinstance(value[0], nn.Module):
        _fail(TypeError, name, value, "a list of encoded examples",
              "this looks like (model, tokenizer); pass the model and the examples separately")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            _fail(TypeError, f"{name}[{i}]", row, 'an encoded example {"input_ids": [...], "labels": [...]}',
                  "encode the rows first: encode_task(rows, tokenizer)")
        if "input_ids" not in row:
            fix = ("these are raw task rows; encode them first: encode_task(rows, tokenizer)"
                   if "prompt" in row else "encode the data with encode_task or encode_texts")
            raise MissingField(f"{name}[{i}] has no 'input_ids' (keys: {sorted(row)}); {fix}")
        ids = _int_list(f"{name}[{i}]['input_ids']", row["input_ids"])
        if not ids:
            raise ValueError(f"{name}[{i}]['input_ids'] is empty: every example needs at least one token")
        labels = _int_list(f"{name}[{i}]['labels']", row["labels"]) if "labels" in row else ids
        if len(labels) != len(ids):
            raise ValueError(f"{name}[{i}] has {len(ids)} input_ids but {len(labels)} labels; they must "
                             "have the same length (one label per position, -100 where not supervised)")
        if context is not None and len(ids) > context:
            raise ValueError(f"{name}[{i}] has {len(ids)} tokens, more than the model's context of {context} "
                             "positions; shorten it (e.g. encode_texts(..., max_length=...)) or drop it")
        if vocab_size is not None:
            bad = [t for t in ids if not 0 <= t < vocab_size]
            bad_labels = [t for t in labels if t != IGNORE_INDEX and not 0 <= t < vocab_size]
            if bad or bad_labels:
                where = "input_ids" if bad else "labels"
                raise ValueError(f"{name}[{i}]['{where}'] holds token id {(bad or bad_labels)[0]}, outside the "
                                 f"model's vocabulary [0, {vocab_size}); was it encoded with another tokenizer?")
        if supervised and all(t == IGNORE_INDEX for t in labels[1:]):
            raise ValueError(f"{name}[{i}] has no supervised token: its labels after the first position are "
                             "all -100, so it contributes no loss, and a batch of such examples gives a NaN "
                             "loss. Keep the answer tokens' labels (encode_task does), or drop the example")
    return rows


def model_limits(model: nn.Module) -> tuple[int | None, int | None]:
    """``(vocab_size, context_length)`` of a causal LM: the rows of its input embedding and
    ``config.n_positions`` / ``max_position_embeddings``; ``None`` where the model does not say."""
    vocab = None
    try:
        emb = model.get_input_embeddings()
        vocab = int(emb.num_embeddings) if emb is not None else None
    except (AttributeError, NotImplementedError):
        pass
    config = getattr(model, "config", None)
    if vocab is None:
        vocab = getattr(config, "vocab_size", None)
    from .arch import max_positions
    return vocab, max_positions(config)


def require_token_ids(name: str, ids: Any, model: nn.Module) -> torch.Tensor:
    """An integer tensor of token ids (batch × length) that ``model`` can embed: every id in its vocabulary
    and the length within its context; checked here rather than met as torch's ``IndexError``."""
    if not isinstance(ids, torch.Tensor):
        _fail(TypeError, name, ids, "a tensor of token ids", "build the batch with peft_lab.collate(examples)")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        _fail(TypeError, name, ids, "a tensor of integer token ids (dtype torch.long)", "use .long()")
    if ids.numel() == 0:
        _fail(ValueError, name, ids, "a non-empty tensor of token ids (no tokens given)")
    vocab, context = model_limits(model)
    if ids.ndim >= 1 and context is not None and ids.shape[-1] > context:
        raise ValueError(f"{name} has {ids.shape[-1]} positions, more than the model's context of {context}; "
                         "use shorter sequences")
    if vocab is not None and ids.device.type != "meta":
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"{name} holds token id {lo if lo < 0 else hi}, outside the model's vocabulary "
                             f"[0, {vocab}); were the ids made by another tokenizer?")
    return ids
