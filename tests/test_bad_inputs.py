"""Bad input never gives a wrong answer silently.

Part 1 is a table of bad or edge inputs across the whole public API: each must raise the stated error type
with a message that names the argument. Part 2 holds the cases where a silent wrong result was possible, as
regression tests asserting the *correct* result. Part 3 checks that saves are atomic and that failed calls
leave the model and the target folder as they were.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import peft_lab
from builders import VOCAB, small_gpt2, small_llama
from peft_lab import core, interop, validate
from peft_lab.data import write_jsonl
from peft_lab.lora import LoRALinear, lora_layers
from peft_lab.paths import write_text_atomic
from peft_lab.tolerance import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["tom went to the park .", "the soup was cold , so mia felt sad ."]


class Ctx:
    """What the cases need, built once: the tiny model and tokenizer, task rows, a small GPT-2 (vocabulary
    100, context 64) and examples that fit it."""

    def __init__(self, tiny):
        self.model, self.tok = tiny
        self.rows = peft_lab.load_task("val", n=4)
        self.encoded = peft_lab.encode_task(self.rows, self.tok)
        self.ex = [{"input_ids": list(range(i, i + 8)), "labels": list(range(i, i + 8))} for i in range(8)]

    def small(self):
        return small_gpt2()

    def lora(self):
        return peft_lab.apply_lora(small_gpt2(), rank=2, alpha=4)


@pytest.fixture(scope="module")
def ctx(tiny):
    return Ctx(tiny)


def _two(c):
    """A small model with named LoRA adapters 'a' and 'b'."""
    return peft_lab.add_lora_adapter(peft_lab.add_lora_adapter(c.small(), "a", rank=2), "b", rank=2)


def _enter(context):
    with context:
        pass


def _merged_then_train(c):
    m = c.lora()
    peft_lab.merge_lora(m)
    peft_lab.train(m, c.ex, steps=1, batch_size=2)


def _inside_disable(c, fn):
    m = c.lora()
    with peft_lab.disable_lora(m):
        fn(m)


def _inside_disable_ia3(c, fn):
    m = peft_lab.apply_ia3(c.small())
    with peft_lab.disable_ia3(m):
        fn(m)


def _empty_folder(c, tmp):
    folder = tmp / "empty"
    folder.mkdir()
    peft_lab.load_base_model(str(folder), device="cpu")


def _file_as_model(c, tmp):
    (tmp / "model.txt").write_text("x")
    peft_lab.load_base_model(str(tmp / "model.txt"), device="cpu")


def _export_onto_file(c, tmp):
    (tmp / "a_file").write_text("x")
    peft_lab.export_peft_adapter(c.lora(), tmp / "a_file")


def _peft_keys_to_lora_loader(c, tmp):
    m = c.lora()
    peft_lab.load_lora_state_dict(m, {"base_model.model." + k: v for k, v in peft_lab.lora_state_dict(m).items()})


def _export_under_a_file(c, tmp):
    (tmp / "a_file").write_text("x")
    peft_lab.export_peft_adapter(c.lora(), tmp / "a_file" / "adapter")


def _peft_folder_as_file(c, tmp):
    folder = peft_lab.export_peft_adapter(c.lora(), tmp / "adapter")
    peft_lab.import_peft_adapter(c.small(), folder / "adapter_model.safetensors")


def _peft_named_adapter(c, tmp):
    from peft import LoraConfig, get_peft_model
    get_peft_model(small_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]), adapter_name="mine").save_pretrained(
        tmp / "saved", selected_adapters=["mine"])
    peft_lab.import_peft_adapter(c.small(), tmp / "saved")


def _train_inside(c, model, disable):
    with disable(model):
        peft_lab.train(model, c.ex, steps=1, batch_size=2)


def _train_inside_disable_prefix(c, tmp):
    _train_inside(c, peft_lab.apply_prefix_tuning(c.small(), 3), peft_lab.disable_prefix)


def _load_adapters_other_settings(c, tmp):
    path = peft_lab.save_adapters(peft_lab.apply_adapters(c.small(), nonlinearity="gelu", scaling=2), tmp / "a.st")
    peft_lab.load_adapters(peft_lab.apply_adapters(c.small()), path)


def _batch(ids, **extra):
    return {"input_ids": ids, **extra}


IDS = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
MEM = {"parameters": 10, "gradients": 10, "optimizer": 20, "activations": 5}
HIST = peft_lab.History(step=[1, 2], loss=[2.0, 1.5])

# (module, id, call(ctx, tmp_path), error type, words the message must contain — the argument's name first)
CASES = [
    # --- models, paths --------------------------------------------------------------------------------
    ("models", "name None", lambda c, t: peft_lab.load_base_model(None), TypeError, ["name"]),
    ("models", "name int", lambda c, t: peft_lab.load_base_model(123), TypeError, ["name"]),
    ("models", "name list", lambda c, t: peft_lab.load_base_model(["gpt2"]), TypeError, ["name"]),
    ("models", "name empty", lambda c, t: peft_lab.load_base_model(""), ValueError, ["name"]),
    ("models", "missing folder", lambda c, t: peft_lab.load_base_model("./no-such-folder", device="cpu"),
     OSError, ["name", "tiny"]),
    ("models", "missing folder ~", lambda c, t: peft_lab.load_base_model("~/no-such-folder-x", device="cpu"),
     OSError, ["name", "tiny"]),
    ("models", "not a hub id", lambda c, t: peft_lab.load_base_model("my model", device="cpu"), OSError,
     ["'my model'", "tiny"]),  # the hub client's HFValidationError (a ValueError) at transformers 4.57
    ("models", "empty folder", _empty_folder, OSError, ["name", "config.json", "tiny"]),
    ("models", "a file, not a folder", _file_as_model, OSError, ["name", "file"]),
    ("models", "device gpu", lambda c, t: peft_lab.load_base_model("tiny", device="gpu"), ValueError, ["device"]),
    ("models", "device int", lambda c, t: peft_lab.load_base_model("tiny", device=1.5), TypeError, ["device"]),
    ("models", "dtype str", lambda c, t: peft_lab.load_base_model("tiny", dtype="float16"), TypeError,
     ["dtype", "torch.float16"]),
    ("models", "build int", lambda c, t: peft_lab.build_from_config(42), TypeError, ["name"]),
    ("models", "build unknown", lambda c, t: peft_lab.build_from_config("gpt5"), ValueError, ["name", "gpt2"]),
    ("models", "build device", lambda c, t: peft_lab.build_from_config("gpt2", device=3), TypeError, ["device"]),
    ("models", "build dtype", lambda c, t: peft_lab.build_from_config("gpt2", dtype="bf16"), TypeError, ["dtype"]),
    ("models", "build seed", lambda c, t: peft_lab.build_from_config("gpt2", seed=1.5), TypeError, ["seed"]),
    ("models", "data_dir missing", lambda c, t: (os.environ.__setitem__("PEFT_LAB_DATA", str(t / "nope")),
                                                 peft_lab.data_dir()), FileNotFoundError, ["PEFT_LAB_DATA", "nope"]),
    ("models", "save_figure name int", lambda c, t: peft_lab.save_figure(None, 3), TypeError, ["name"]),
    ("models", "pick_device gpu", lambda c, t: peft_lab.pick_device("gpu"), ValueError, ["device"]),
    ("models", "pick_device float", lambda c, t: peft_lab.pick_device(1.5), TypeError, ["device"]),
    # --- data -----------------------------------------------------------------------------------------
    ("data", "load_task n=-1", lambda c, t: peft_lab.load_task("train", n=-1), ValueError, ["n", ">= 0"]),
    ("data", "load_task n=2.5", lambda c, t: peft_lab.load_task("train", n=2.5), TypeError, ["n"]),
    ("data", "load_task n='10'", lambda c, t: peft_lab.load_task("train", n="10"), TypeError, ["n"]),
    ("data", "load_task n too big", lambda c, t: peft_lab.load_task("val", n=10**6), ValueError, ["n", "300"]),
    ("data", "load_task split", lambda c, t: peft_lab.load_task("training"), ValueError, ["split"]),
    ("data", "load_heldout n=-1", lambda c, t: peft_lab.load_heldout(n=-1), ValueError, ["n"]),
    ("data", "encode_task str", lambda c, t: peft_lab.encode_task("review: x verdict:", c.tok), TypeError,
     ["examples", "wrap"]),
    ("data", "encode_task one row", lambda c, t: peft_lab.encode_task(c.rows[0], c.tok), TypeError,
     ["examples", "[examples]"]),
    ("data", "encode_task wrong keys", lambda c, t: peft_lab.encode_task([{"text": "x"}], c.tok), KeyError,
     ["examples[0]", "prompt"]),
    ("data", "encode_task encoded rows", lambda c, t: peft_lab.encode_task(c.encoded, c.tok), KeyError,
     ["examples[0]", "load_task"]),
    ("data", "encode_task tokenizer str", lambda c, t: peft_lab.encode_task(c.rows, "tok"), TypeError,
     ["tokenizer"]),
    ("data", "encode_task model as tokenizer", lambda c, t: peft_lab.encode_task(c.rows, c.model), TypeError,
     ["tokenizer"]),
    ("data", "encode_task prompt int", lambda c, t: peft_lab.encode_task([{"prompt": 1, "answer": "good"}], c.tok),
     TypeError, ["examples[0]['prompt']"]),
    ("data", "encode_texts str", lambda c, t: peft_lab.encode_texts("one string", c.tok), TypeError,
     ["texts", "[texts]"]),
    ("data", "encode_texts ints", lambda c, t: peft_lab.encode_texts([1, 2], c.tok), TypeError, ["texts[0]"]),
    ("data", "encode_texts max_length 0", lambda c, t: peft_lab.encode_texts(TEXTS, c.tok, max_length=0),
     ValueError, ["max_length"]),
    ("data", "encode_texts max_length float", lambda c, t: peft_lab.encode_texts(TEXTS, c.tok, max_length=2.0),
     TypeError, ["max_length", "pass 2"]),
    ("data", "collate empty", lambda c, t: peft_lab.collate([]), ValueError, ["examples"]),
    ("data", "collate raw rows", lambda c, t: peft_lab.collate(c.rows), KeyError, ["examples[0]", "encode_task"]),
    ("data", "collate no tokens", lambda c, t: peft_lab.collate([{"input_ids": []}]), ValueError, ["examples[0]"]),
    ("data", "collate float ids", lambda c, t: peft_lab.collate([{"input_ids": [1.5, 2]}]), TypeError,
     ["examples[0]['input_ids'][0]"]),
    ("data", "collate label length", lambda c, t: peft_lab.collate([{"input_ids": [1, 2], "labels": [1]}]),
     ValueError, ["examples[0]", "labels"]),
    ("data", "collate pad_id", lambda c, t: peft_lab.collate(c.ex, pad_id=-1), ValueError, ["pad_id"]),
    ("data", "collate str", lambda c, t: peft_lab.collate("abc"), TypeError, ["examples"]),
    ("data", "perplexity str", lambda c, t: peft_lab.perplexity(c.model, c.tok, "one string"), TypeError,
     ["texts", "[texts]"]),
    ("data", "perplexity empty", lambda c, t: peft_lab.perplexity(c.model, c.tok, []), ValueError, ["texts"]),
    ("data", "perplexity only empty texts", lambda c, t: peft_lab.perplexity(c.model, c.tok, [""]), ValueError,
     ["texts"]),
    ("data", "perplexity swapped", lambda c, t: peft_lab.perplexity(c.tok, c.model, TEXTS), TypeError, ["model"]),
    ("data", "perplexity pair", lambda c, t: peft_lab.perplexity((c.model, c.tok), c.tok, TEXTS), TypeError,
     ["model", "unpack"]),
    ("data", "perplexity batch_size", lambda c, t: peft_lab.perplexity(c.model, c.tok, TEXTS, batch_size=0),
     ValueError, ["batch_size"]),
    ("data", "perplexity longer than context",
     lambda c, t: peft_lab.perplexity(c.model, c.tok, [" ".join(["tom"] * 300)]), ValueError,
     ["texts[0]", "context of 128"]),
    ("data", "perplexity ids beyond vocab", lambda c, t: peft_lab.perplexity(c.small(), c.tok, TEXTS), ValueError,
     ["texts[0]", "vocabulary"]),
    ("data", "evaluate encoded rows", lambda c, t: peft_lab.evaluate_task(c.model, c.tok, c.encoded), KeyError,
     ["examples[0]", "load_task"]),
    ("data", "evaluate str", lambda c, t: peft_lab.evaluate_task(c.model, c.tok, "review: x verdict:"), TypeError,
     ["examples"]),
    ("data", "evaluate batch_size", lambda c, t: peft_lab.evaluate_task(c.model, c.tok, c.rows, batch_size=0),
     ValueError, ["batch_size"]),
    ("data", "evaluate choices str", lambda c, t: peft_lab.evaluate_task(c.model, c.tok, c.rows, choices="good"),
     TypeError, ["choices"]),
    ("data", "evaluate empty", lambda c, t: peft_lab.evaluate_task(c.model, c.tok, []), ValueError, ["examples"]),
    ("data", "evaluate tokenizer", lambda c, t: peft_lab.evaluate_task(c.model, "tok", c.rows), TypeError,
     ["tokenizer"]),
    ("data", "write_jsonl empty path", lambda c, t: write_jsonl([{"a": 1}], ""), ValueError, ["path"]),
    # --- train ----------------------------------------------------------------------------------------
    ("train", "model pair", lambda c, t: peft_lab.train((c.model, c.tok), c.encoded), TypeError, ["model", "unpack"]),
    ("train", "raw rows", lambda c, t: peft_lab.train(c.small(), c.rows), KeyError, ["examples[0]", "encode_task"]),
    ("train", "examples = (model, tok)", lambda c, t: peft_lab.train(c.small(), (c.model, c.tok)), TypeError,
     ["examples"]),
    ("train", "examples str", lambda c, t: peft_lab.train(c.small(), "some text"), TypeError, ["examples"]),
    ("train", "lr str", lambda c, t: peft_lab.train(c.small(), c.ex, lr="1e-3"), TypeError, ["lr", "lr=1e-3"]),
    ("train", "steps 2.5", lambda c, t: peft_lab.train(c.small(), c.ex, steps=2.5), TypeError, ["steps"]),
    ("train", "batch_size 2.0", lambda c, t: peft_lab.train(c.small(), c.ex, batch_size=2.0), TypeError,
     ["batch_size", "pass 2"]),
    ("train", "steps 0", lambda c, t: peft_lab.train(c.small(), c.ex, steps=0), ValueError, ["steps"]),
    ("train", "lr 0", lambda c, t: peft_lab.train(c.small(), c.ex, lr=0), ValueError, ["lr"]),
    ("train", "lr nan", lambda c, t: peft_lab.train(c.small(), c.ex, lr=float("nan")), ValueError, ["lr"]),
    ("train", "weight_decay", lambda c, t: peft_lab.train(c.small(), c.ex, weight_decay=-1), ValueError,
     ["weight_decay"]),
    ("train", "warmup_steps", lambda c, t: peft_lab.train(c.small(), c.ex, warmup_steps=-1), ValueError,
     ["warmup_steps"]),
    ("train", "schedule", lambda c, t: peft_lab.train(c.small(), c.ex, schedule="linear"), ValueError,
     ["schedule"]),
    ("train", "grad_clip 0", lambda c, t: peft_lab.train(c.small(), c.ex, grad_clip=0), ValueError, ["grad_clip"]),
    ("train", "eval_fn number", lambda c, t: peft_lab.train(c.small(), c.ex, eval_fn=0.5), TypeError, ["eval_fn"]),
    ("train", "eval_fn result str", lambda c, t: peft_lab.train(c.small(), c.ex, steps=1, batch_size=2,
                                                                 eval_fn=lambda m: "good"), TypeError, ["eval_fn"]),
    ("train", "eval_every 0", lambda c, t: peft_lab.train(c.small(), c.ex, eval_every=0), ValueError,
     ["eval_every"]),
    ("train", "seed str", lambda c, t: peft_lab.train(c.small(), c.ex, seed="0"), TypeError, ["seed"]),
    ("train", "progress str", lambda c, t: peft_lab.train(c.small(), c.ex, progress="yes"), TypeError,
     ["progress"]),
    ("train", "pad_id beyond vocab", lambda c, t: peft_lab.train(c.small(), c.ex, pad_id=VOCAB), ValueError,
     ["pad_id"]),
    ("train", "all labels masked", lambda c, t: peft_lab.train(
        c.small(), [{"input_ids": [1, 2, 3], "labels": [-100] * 3}] * 4, batch_size=2), ValueError,
     ["examples[0]", "supervised"]),
    ("train", "token id >= vocab", lambda c, t: peft_lab.train(
        c.small(), [{"input_ids": [1, VOCAB], "labels": [1, VOCAB]}] * 2, batch_size=2), ValueError,
     ["examples[0]", "vocabulary"]),
    ("train", "longer than context", lambda c, t: peft_lab.train(
        c.small(), [{"input_ids": [1] * 65}] * 2, batch_size=2), ValueError, ["examples[0]", "context of 64"]),
    ("train", "batch larger than data", lambda c, t: peft_lab.train(c.small(), c.ex[:3], batch_size=4),
     ValueError, ["batch_size"]),
    ("train", "after merge_lora", lambda c, t: _merged_then_train(c), ValueError, ["merged", "unmerge_lora"]),
    ("train", "inside disable_lora", lambda c, t: _inside_disable(
        c, lambda m: peft_lab.train(m, c.ex, steps=1, batch_size=2)), ValueError, ["disable"]),
    # --- measure --------------------------------------------------------------------------------------
    ("measure", "count pair", lambda c, t: peft_lab.count_parameters((c.model, c.tok)), TypeError,
     ["model", "unpack"]),
    ("measure", "print no parameters", lambda c, t: peft_lab.print_trainable_parameters(nn.Sequential()),
     ValueError, ["model", "no parameters"]),
    ("measure", "mask shape", lambda c, t: peft_lab.measure_memory(
        c.small(), _batch(IDS, attention_mask=torch.ones(2, 5, dtype=torch.long))), ValueError,
     ["attention_mask", "(2, 8)"]),
    ("measure", "labels shape", lambda c, t: peft_lab.measure_memory(c.small(), _batch(IDS, labels=IDS[:, :4])),
     ValueError, ["labels"]),
    ("measure", "ids beyond vocab", lambda c, t: peft_lab.measure_memory(c.small(), _batch(IDS + VOCAB)),
     ValueError, ["input_ids", "vocabulary"]),
    ("measure", "longer than context", lambda c, t: peft_lab.measure_memory(
        c.small(), _batch(torch.zeros(1, 65, dtype=torch.long))), ValueError, ["input_ids", "context of 64"]),
    ("measure", "1-d ids", lambda c, t: peft_lab.measure_memory(c.small(), _batch(IDS[0])), ValueError,
     ["input_ids", "unsqueeze"]),
    ("measure", "batch as list", lambda c, t: peft_lab.measure_memory(c.small(), [IDS]), TypeError, ["batch"]),
    ("measure", "estimate seq_len > context", lambda c, t: peft_lab.estimate_memory("gpt2", seq_len=2048),
     ValueError, ["seq_len", "1024"]),
    ("measure", "estimate batch_size 1.5", lambda c, t: peft_lab.estimate_memory("gpt2", batch_size=1.5),
     TypeError, ["batch_size"]),
    ("measure", "estimate precision", lambda c, t: peft_lab.estimate_memory("gpt2", precision="fp16"), ValueError,
     ["precision"]),
    ("measure", "estimate trainable -1", lambda c, t: peft_lab.estimate_memory("gpt2", trainable_params=-1),
     ValueError, ["trainable_params"]),
    ("measure", "estimate trainable str", lambda c, t: peft_lab.estimate_memory("gpt2", trainable_params="100"),
     TypeError, ["trainable_params"]),
    ("measure", "time_fn not callable", lambda c, t: peft_lab.time_fn(42), TypeError, ["fn"]),
    ("measure", "time_fn repeats float", lambda c, t: peft_lab.time_fn(lambda: None, repeats=2.0), TypeError,
     ["repeats"]),
    ("measure", "time_fn warmup", lambda c, t: peft_lab.time_fn(lambda: None, warmup=-1), ValueError, ["warmup"]),
    # --- plots ----------------------------------------------------------------------------------------
    ("plots", "history list", lambda c, t: peft_lab.plot_history([HIST]), TypeError, ["histories", "{"]),
    ("plots", "history bare", lambda c, t: peft_lab.plot_history(HIST), TypeError, ["histories"]),
    ("plots", "history of losses", lambda c, t: peft_lab.plot_history({"a": [0.1, 0.2]}), TypeError,
     ["histories['a']"]),
    ("plots", "history smooth 0", lambda c, t: peft_lab.plot_history({"a": HIST}, smooth=0), ValueError,
     ["smooth"]),
    ("plots", "history empty", lambda c, t: peft_lab.plot_history({}), ValueError, ["histories"]),
    ("plots", "memory list", lambda c, t: peft_lab.plot_memory([MEM]), TypeError, ["breakdowns"]),
    ("plots", "memory strings", lambda c, t: peft_lab.plot_memory({"a": {**MEM, "parameters": "12"}}), TypeError,
     ["breakdowns['a']['parameters']"]),
    ("plots", "memory entry not a dict", lambda c, t: peft_lab.plot_memory({"a": 12}), TypeError,
     ["breakdowns['a']"]),
    ("plots", "memory unit", lambda c, t: peft_lab.plot_memory({"a": MEM}, unit="MB"), ValueError, ["unit"]),
    ("plots", "parameters list", lambda c, t: peft_lab.plot_parameters([1, 2]), TypeError, ["counts"]),
    ("plots", "parameters str", lambda c, t: peft_lab.plot_parameters({"a": "12"}), TypeError, ["counts['a']"]),
    ("plots", "parameters fraction", lambda c, t: peft_lab.plot_parameters({"a": 2.7}), TypeError,
     ["counts['a']"]),
    ("plots", "parameters negative", lambda c, t: peft_lab.plot_parameters({"a": -1}), ValueError,
     ["counts['a']"]),
    ("plots", "parameters log str", lambda c, t: peft_lab.plot_parameters({"a": 1}, log="yes"), TypeError,
     ["log"]),
    # --- exercises, results ---------------------------------------------------------------------------
    ("exercises", "check id float", lambda c, t: peft_lab.check(2.2, 4), TypeError, ["id", '"02.ex2"']),
    ("exercises", "check unknown id", lambda c, t: peft_lab.check("99.9", 4), ValueError, ["id", "known"]),
    ("results", "record empty key", lambda c, t: peft_lab.record("", 1), ValueError, ["key"]),
    ("results", "record int key", lambda c, t: peft_lab.record(3, 1), TypeError, ["key"]),
    ("results", "record a model", lambda c, t: peft_lab.record("k", c.small()), TypeError, ["value"]),
    # --- lora -----------------------------------------------------------------------------------------
    ("lora", "apply to pair", lambda c, t: peft_lab.apply_lora((c.model, c.tok)), TypeError, ["model", "unpack"]),
    ("lora", "rank str", lambda c, t: peft_lab.apply_lora(c.small(), rank="8"), TypeError, ["rank"]),
    ("lora", "rank np.float64", lambda c, t: peft_lab.apply_lora(c.small(), rank=np.float64(8.5)), TypeError,
     ["rank"]),
    ("lora", "alpha str", lambda c, t: peft_lab.apply_lora(c.small(), alpha="16"), TypeError, ["alpha"]),
    ("lora", "alpha inf", lambda c, t: peft_lab.apply_lora(c.small(), alpha=float("inf")), ValueError, ["alpha"]),
    ("lora", "dropout None", lambda c, t: peft_lab.apply_lora(c.small(), dropout=None), TypeError, ["dropout"]),
    ("lora", "target short name as str", lambda c, t: peft_lab.apply_lora(c.small(), target_modules="c_attn"),
     ValueError, ["target_modules", "['c_attn']"]),
    ("lora", "target invalid regex", lambda c, t: peft_lab.apply_lora(c.small(), target_modules="c_attn["),
     ValueError, ["target_modules", "regular expression"]),
    ("lora", "target list with int", lambda c, t: peft_lab.apply_lora(c.small(), target_modules=["c_attn", 3]),
     ValueError, ["target_modules"]),
    ("lora", "target dict", lambda c, t: peft_lab.apply_lora(c.small(), target_modules={"c_attn": 1}), TypeError,
     ["target_modules"]),
    ("lora", "tied lm_head", lambda c, t: peft_lab.apply_lora(c.small(), target_modules=["lm_head"]), ValueError,
     ["target_modules", "tied", "wte"]),
    ("lora", "use_rslora 1", lambda c, t: peft_lab.apply_lora(c.small(), use_rslora=1), TypeError, ["use_rslora"]),
    ("lora", "scaling rank 0", lambda c, t: peft_lab.lora_scaling(0, 16), ValueError, ["rank"]),
    ("lora", "scaling alpha str", lambda c, t: peft_lab.lora_scaling(8, "16"), TypeError, ["alpha"]),
    ("lora", "LoRALinear on Embedding", lambda c, t: LoRALinear(nn.Embedding(3, 4)), TypeError, ["base_layer"]),
    ("lora", "LoRALinear rank 0", lambda c, t: LoRALinear(nn.Linear(4, 4), rank=0), ValueError, ["rank"]),
    ("lora", "merge inside disable", lambda c, t: _inside_disable(c, peft_lab.merge_lora), ValueError,
     ["merge_lora", "disable_lora"]),
    ("lora", "unmerge inside disable", lambda c, t: _inside_disable(c, peft_lab.unmerge_lora), ValueError,
     ["unmerge_lora", "disable_lora"]),
    ("lora", "remove inside disable", lambda c, t: _inside_disable(c, peft_lab.remove_lora), ValueError,
     ["remove_lora", "disable_lora"]),
    ("lora", "remove merge str", lambda c, t: peft_lab.remove_lora(c.lora(), merge="no"), TypeError, ["merge"]),
    ("lora", "load list", lambda c, t: peft_lab.load_lora_state_dict(c.lora(), [torch.zeros(1)]), TypeError,
     ["state_dict"]),
    ("lora", "load numpy values", lambda c, t: peft_lab.load_lora_state_dict(
        m := c.lora(), {k: v.numpy() for k, v in peft_lab.lora_state_dict(m).items()}), TypeError,
     ["state_dict[", "torch.as_tensor"]),
    ("lora", "load int tensors", lambda c, t: peft_lab.load_lora_state_dict(
        m := c.lora(), {k: v.long() for k, v in peft_lab.lora_state_dict(m).items()}), TypeError,
     ["state_dict[", "floating-point"]),
    ("lora", "lora_layers str", lambda c, t: list(lora_layers("model")), TypeError, ["model"]),
    ("lora", "lora_state_dict pair", lambda c, t: peft_lab.lora_state_dict((c.model, c.tok)), TypeError,
     ["model", "unpack"]),
    ("lora", "lora_config str", lambda c, t: peft_lab.lora_config("model"), TypeError, ["model"]),
    ("lora", "ΔM/ΔD of a list", lambda c, t: peft_lab.magnitude_direction_change([1.0], torch.ones(2, 2)), TypeError,
     ["w0", "torch.Tensor"]),
    ("lora", "ΔM/ΔD shapes differ", lambda c, t: peft_lab.magnitude_direction_change(torch.ones(2, 3),
                                                                                    torch.ones(3, 2)), ValueError,
     ["w0", "(2, 3)", "(3, 2)"]),
    ("lora", "query changes of a str", lambda c, t: peft_lab.query_weight_changes("model", c.small()), TypeError,
     ["model"]),
    ("lora", "query changes against a pair", lambda c, t: peft_lab.query_weight_changes(c.small(), (c.model, c.tok)),
     TypeError, ["base", "unpack"]),
    ("lora", "use_dora str", lambda c, t: peft_lab.apply_lora(c.small(), use_dora="yes"), TypeError, ["use_dora"]),
    # --- qlora ----------------------------------------------------------------------------------------
    ("qlora", "nf4 offset above 1", lambda c, t: peft_lab.nf4_code(2.0), ValueError, ["offset", "< 1"]),
    ("qlora", "quantize a list", lambda c, t: peft_lab.quantize_nf4([1.0]), TypeError, ["weight", "list"]),
    ("qlora", "quantize a pair", lambda c, t: peft_lab.quantize_model((c.model, c.tok)), TypeError, ["model"]),
    ("qlora", "dequantize a name", lambda c, t: peft_lab.dequantize_model("tiny"), TypeError,
     ["model", "load_base_model"]),
    ("qlora", "stored bytes of None", lambda c, t: peft_lab.stored_bytes(None), TypeError, ["model", "None"]),
    # --- ia3 ------------------------------------------------------------------------------------------
    ("ia3", "apply to pair", lambda c, t: peft_lab.apply_ia3((c.model, c.tok)), TypeError, ["model", "unpack"]),
    ("ia3", "target dict", lambda c, t: peft_lab.apply_ia3(c.small(), target_modules={"c_attn": 1}), TypeError,
     ["target_modules"]),
    ("ia3", "target short name as str", lambda c, t: peft_lab.apply_ia3(c.small(), target_modules="c_attn"),
     ValueError, ["target_modules", "['c_attn']"]),
    ("ia3", "feedforward int", lambda c, t: peft_lab.apply_ia3(c.small(), feedforward_modules=3), TypeError,
     ["feedforward_modules"]),
    ("ia3", "feedforward not a subset", lambda c, t: peft_lab.apply_ia3(c.small(), target_modules=["c_attn"],
                                                                       feedforward_modules=["c_fc"]),
     ValueError, ["feedforward_modules", "subset"]),
    ("ia3", "feedforward list with int", lambda c, t: peft_lab.apply_ia3(c.small(), feedforward_modules=["c", 3]),
     ValueError, ["feedforward_modules"]),
    ("ia3", "tied lm_head", lambda c, t: peft_lab.apply_ia3(c.small(), target_modules=["lm_head"],
                                                           feedforward_modules=[]), ValueError, ["lm_head", "tied"]),
    ("ia3", "IA3Layer on Embedding", lambda c, t: peft_lab.IA3Layer(nn.Embedding(3, 4)), TypeError, ["base_layer"]),
    ("ia3", "IA3Layer feedforward str", lambda c, t: peft_lab.IA3Layer(nn.Linear(2, 2), "yes"), TypeError,
     ["is_feedforward"]),
    ("ia3", "merge without IA3", lambda c, t: peft_lab.merge_ia3(c.small()), ValueError, ["apply_ia3"]),
    ("ia3", "merge inside disable", lambda c, t: _inside_disable_ia3(c, peft_lab.merge_ia3), ValueError,
     ["merge_ia3", "disable_ia3"]),
    ("ia3", "unmerge inside disable", lambda c, t: _inside_disable_ia3(c, peft_lab.unmerge_ia3), ValueError,
     ["unmerge_ia3", "disable_ia3"]),
    ("ia3", "remove inside disable", lambda c, t: _inside_disable_ia3(c, peft_lab.remove_ia3), ValueError,
     ["remove_ia3", "disable_ia3"]),
    ("ia3", "remove merge str", lambda c, t: peft_lab.remove_ia3(peft_lab.apply_ia3(c.small()), merge="no"),
     TypeError, ["merge"]),
    ("ia3", "load list", lambda c, t: peft_lab.load_ia3_state_dict(peft_lab.apply_ia3(c.small()), [torch.ones(1)]),
     TypeError, ["state_dict"]),
    ("ia3", "load LoRA keys", lambda c, t: peft_lab.load_ia3_state_dict(peft_lab.apply_ia3(c.small()),
                                                                       peft_lab.lora_state_dict(c.lora())),
     ValueError, ["IA3", "missing keys"]),
    ("ia3", "ia3_layers str", lambda c, t: list(peft_lab.ia3_layers("model")), TypeError, ["model"]),
    ("ia3", "ia3_state_dict without IA3", lambda c, t: peft_lab.ia3_state_dict(c.small()), ValueError,
     ["apply_ia3"]),
    ("ia3", "ia3_config str", lambda c, t: peft_lab.ia3_config("model"), TypeError, ["model"]),
    ("ia3", "disable_ia3 without IA3", lambda c, t: peft_lab.disable_ia3(c.small()).__enter__(), ValueError,
     ["apply_ia3"]),
    # --- interop --------------------------------------------------------------------------------------
    ("interop", "export to ''", lambda c, t: peft_lab.export_peft_adapter(c.lora(), ""), ValueError, ["path"]),
    ("interop", "export to int", lambda c, t: peft_lab.export_peft_adapter(c.lora(), 42), TypeError, ["path"]),
    ("interop", "export pair", lambda c, t: peft_lab.export_peft_adapter((c.model, c.tok), t), TypeError,
     ["model", "unpack"]),
    ("interop", "export onto a file", _export_onto_file, FileExistsError, ["path", "folder"]),
    ("interop", "export task_type", lambda c, t: peft_lab.export_peft_adapter(c.lora(), t, task_type=3),
     TypeError, ["task_type"]),
    ("interop", "import from ''", lambda c, t: peft_lab.import_peft_adapter(c.small(), ""), ValueError, ["path"]),
    ("interop", "import from None", lambda c, t: peft_lab.import_peft_adapter(c.small(), None), TypeError,
     ["path"]),
    ("interop", "import into str", lambda c, t: peft_lab.import_peft_adapter("model", t), TypeError, ["model"]),
    ("interop", "import missing folder", lambda c, t: peft_lab.import_peft_adapter(c.small(), t / "nope"),
     FileNotFoundError, ["path"]),
    # --- many adapters on one base (multi_lora) and LoRA+ ------------------------------------------------
    ("multi_lora", "adapter named __base__", lambda c, t: peft_lab.add_lora_adapter(c.small(), "__base__"),
     ValueError, ["reserved"]),
    ("multi_lora", "adapter name int", lambda c, t: peft_lab.add_lora_adapter(c.small(), 3), TypeError, ["name"]),
    ("multi_lora", "names of a plain model", lambda c, t: peft_lab.lora_adapter_names(c.small()), ValueError,
     ["add_lora_adapter"]),
    ("multi_lora", "activate unknown", lambda c, t: peft_lab.set_active_adapter(_two(c), "nope"), ValueError,
     ["nope", "'a'"]),
    ("multi_lora", "state dict unknown", lambda c, t: peft_lab.lora_adapter_state_dict(_two(c), "nope"),
     ValueError, ["nope"]),
    ("multi_lora", "mixed batch str", lambda c, t: _enter(peft_lab.mixed_batch(_two(c), "a")), TypeError,
     ["adapter_names"]),
    ("multi_lora", "mixed batch how", lambda c, t: _enter(peft_lab.mixed_batch(_two(c), ["a"], how="bgmv")),
     ValueError, ["how", "gathered"]),
    ("multi_lora", "hotswap wrong keys", lambda c, t: peft_lab.hotswap_adapter(_two(c), "a", {"x": torch.ones(1)}),
     ValueError, ["adapter 'a'"]),
    ("multi_lora", "merge svd", lambda c, t: peft_lab.merge_adapters(_two(c), ["a", "b"], [1, 1], combination="svd"),
     ValueError, ["combination", "ties"]),
    ("multi_lora", "remove from plain", lambda c, t: peft_lab.remove_lora_adapters(c.small()), ValueError,
     ["add_lora_adapter"]),
    ("lora", "LoRA+ lr str", lambda c, t: peft_lab.loraplus_optimizer(c.lora(), lr="1e-3"), TypeError, ["lr"]),
    ("lora", "LoRA+ ratio 0", lambda c, t: peft_lab.loraplus_optimizer(c.lora(), lr=1e-3, ratio=0), ValueError,
     ["ratio"]),
    # --- adapters, AdapterHub --------------------------------------------------------------------------
    ("adapters", "bottleneck_dim str", lambda c, t: peft_lab.apply_adapters(c.small(), bottleneck_dim="8"),
     TypeError, ["bottleneck_dim", "'8'"]),
    ("adapters", "placement sequential", lambda c, t: peft_lab.apply_adapters(c.small(), placement="sequential"),
     ValueError, ["placement", "houlsby"]),
    ("adapters", "init zeros", lambda c, t: peft_lab.apply_adapters(c.small(), init="zeros"), ValueError,
     ["init", "'zero'"]),
    ("adapters", "apply to str", lambda c, t: peft_lab.apply_adapters("gpt2"), TypeError, ["model"]),
    ("adapters", "layers of str", lambda c, t: list(peft_lab.bottleneck_layers("m")), TypeError, ["model"]),
    ("adapters", "save to ''", lambda c, t: peft_lab.save_adapters(peft_lab.apply_adapters(c.small()), ""),
     ValueError, ["path"]),
    ("adapters", "load other settings", _load_adapters_other_settings, ValueError,
     ["nonlinearity: file 'gelu', model 'relu'", "scaling", "remove_adapters"]),
    ("adapters", "load missing file", lambda c, t: peft_lab.load_adapters(c.small(), t / "no.safetensors"),
     FileNotFoundError, ["path", "save_adapters"]),
    ("adapters", "config of a plain model", lambda c, t: peft_lab.bottleneck_config(c.small()), ValueError,
     ["bottleneck adapter", "apply_adapters"]),
    ("adapters", "state dict of a pair", lambda c, t: peft_lab.bottleneck_state_dict((c.model, c.tok)), TypeError,
     ["model", "unpack"]),
    ("adapters", "disable a plain model", lambda c, t: peft_lab.disable_adapters(c.small()).__enter__(), ValueError,
     ["bottleneck adapter", "apply_adapters"]),
    ("adapters", "remove from a plain model", lambda c, t: peft_lab.remove_adapters(c.small()), ValueError,
     ["bottleneck adapter", "apply_adapters"]),
    ("adapters", "load LoRA weights", lambda c, t: peft_lab.load_bottleneck_state_dict(
        peft_lab.apply_adapters(c.small()), peft_lab.lora_state_dict(c.lora())), ValueError,
     ["adapter weights", "missing keys"]),
    ("adapters", "hub export name", lambda c, t: peft_lab.export_adapterhub_adapter(
        peft_lab.apply_adapters(c.small()), t, "a b"), ValueError, ["name"]),
    ("adapters", "hub import from int", lambda c, t: peft_lab.import_adapterhub_adapter(c.small(), 3), TypeError,
     ["path"]),
    # --- prefix and prompt tuning ---------------------------------------------------------------------
    ("prefix", "tokens str", lambda c, t: peft_lab.apply_prefix_tuning(c.small(), "3"), TypeError,
     ["num_virtual_tokens", "without quotes"]),
    ("prefix", "projection str", lambda c, t: peft_lab.apply_prefix_tuning(c.small(), 3, projection_dim="64"),
     TypeError, ["projection_dim", "without quotes"]),
    ("prefix", "init zeros", lambda c, t: peft_lab.apply_prefix_tuning(c.small(), 3, init="zeros"), ValueError,
     ["init", "'zero'"]),
    ("prefix", "prompt tokens 0", lambda c, t: peft_lab.apply_prompt_tuning(c.small(), 0), ValueError,
     ["num_virtual_tokens", ">= 1"]),
    ("prefix", "prompt text without tokenizer",
     lambda c, t: peft_lab.apply_prompt_tuning(c.small(), 3, init="text", init_text="hi"), ValueError,
     ["init", "tokenizer"]),
    ("prefix", "prompt bare text as init", lambda c, t: peft_lab.apply_prompt_tuning(c.small(), 3, init="a review"),
     ValueError, ["init", "init='text', init_text='a review'"]),
    ("prefix", "prefix text with projection",
     lambda c, t: peft_lab.apply_prefix_tuning(c.small(), 3, projection_dim=8, init="text", init_text="hi",
                                               tokenizer=c.tok), ValueError, ["init='text'", "projection_dim"]),
    ("prefix", "prefix init_text without text init",
     lambda c, t: peft_lab.apply_prefix_tuning(c.small(), 3, init_text="hi"), ValueError, ["init_text", "init='text'"]),
    ("prefix", "fold a plain model", lambda c, t: peft_lab.fold_prefix_projection(c.small()), TypeError,
     ["model", "PrefixModel"]),
    ("prefix", "remove from str", lambda c, t: peft_lab.remove_prefix("m"), TypeError, ["model"]),
    ("prefix", "train inside disable_prefix", _train_inside_disable_prefix, ValueError, ["train", "disable_"]),
    ("adapters", "train inside disable_adapters", lambda c, t: _train_inside(c, peft_lab.apply_adapters(c.small()),
                                                                             peft_lab.disable_adapters),
     ValueError, ["train", "disable_"]),
    # --- the four cases a probe found unclear ---------------------------------------------------------
    ("lora", "PEFT's keys to the LoRA loader", _peft_keys_to_lora_loader, ValueError,
     ["base_model.model.", "import_peft_adapter"]),
    ("interop", "export under a file", _export_under_a_file, NotADirectoryError,
     ["a_file/adapter", "a_file' is a file"]),
    ("interop", "import a file", _peft_folder_as_file, NotADirectoryError, ["path", "is a file", "folder"]),
    ("interop", "PEFT's named adapter", _peft_named_adapter, FileNotFoundError,
     ["adapter_config.json is missing", "mine/adapter_config.json", "saved/mine"]),
    # --- core -----------------------------------------------------------------------------------------
    ("core", "resolve_targets int", lambda c, t: core.resolve_targets(c.small(), 42, {}, (nn.Linear,)), TypeError,
     ["target_modules"]),
    ("core", "resolve_targets empty str", lambda c, t: core.resolve_targets(c.small(), "", {}, (nn.Linear,)),
     ValueError, ["target_modules"]),
    ("core", "replace unknown name", lambda c, t: core.replace_module(c.small(), "no.such", nn.Identity()),
     ValueError, ["name", "named_modules"]),
    ("core", "replace with str", lambda c, t: core.replace_module(c.small(), "lm_head", "x"), TypeError, ["new"]),
    ("core", "freeze str", lambda c, t: core.freeze("model"), TypeError, ["model"]),
    ("core", "load_adapter_state_dict list", lambda c, t: core.load_adapter_state_dict({}, [1]), TypeError,
     ["state_dict"]),
    ("core", "require_layers str", lambda c, t: core.require_layers("m", LoRALinear, "LoRA", "apply_lora"),
     TypeError, ["model"]),
    ("core", "require_untied tied", lambda c, t: core.require_untied(c.small(), ["lm_head"]), ValueError,
     ["target_modules", "tied"]),
]


@pytest.mark.parametrize("module, call, error, words", [pytest.param(*case[:1], *case[2:], id=f"{case[0]}: {case[1]}")
                                                        for case in CASES])
def test_bad_input_is_refused_with_a_message_naming_it(ctx, tmp_path, monkeypatch, module, call, error, words):
    monkeypatch.setenv("HOME", str(tmp_path))  # "~" cases stay inside the test's folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PEFT_LAB_DATA", os.environ.get("PEFT_LAB_DATA", ""))  # restored after a case sets it
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error) as info:
        call(ctx, tmp_path)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"


def _names_called(fn, seen=None) -> set[str]:
    """The names a case's code refers to, following the helper functions of this module it calls."""
    seen = set() if seen is None else seen
    names = set(fn.__code__.co_names)
    for const in fn.__code__.co_consts:  # nested lambdas
        if hasattr(const, "co_names"):
            names |= set(const.co_names)
    for name in names - seen:
        seen.add(name)
        helper = globals().get(name)
        if callable(helper) and getattr(helper, "__module__", None) == __name__ and hasattr(helper, "__code__"):
            names |= _names_called(helper, seen)
    return names


def test_every_public_function_has_a_bad_input_case():
    """Each function the notebooks import from ``peft_lab`` is called with a bad input by some row above;
    a new public function without one fails here."""
    import inspect
    called = set().union(*(_names_called(case[2]) for case in CASES))
    public = {n for n, obj in vars(peft_lab).items() if not n.startswith("_") and inspect.isfunction(obj)}
    assert public - called == set()


# ---------------------------------------------------------------------------------------------------------
# Part 2: inputs that could give a silent wrong result
# ---------------------------------------------------------------------------------------------------------

N_03EX2 = 16_910_336   # 03.ex2's answer: exact in float32 too (even, below 2**25)


@pytest.mark.parametrize("answer", [N_03EX2, float(N_03EX2), np.float64(N_03EX2), np.float32(N_03EX2),
                                    np.int64(N_03EX2), np.array(float(N_03EX2)), torch.tensor(float(N_03EX2)),
                                    torch.tensor(N_03EX2)], ids=repr)
def test_check_accepts_numpy_and_torch_scalars(answer):
    assert peft_lab.check("03.ex2", answer, verbose=False) is True
    assert peft_lab.check("03.ex2", answer + 2, verbose=False) is False


@pytest.mark.parametrize("answer", [str(N_03EX2), True, [N_03EX2]], ids=repr)
def test_check_marks_non_numbers_wrong(answer):
    assert peft_lab.check("03.ex2", answer, verbose=False) is False


def test_perplexity_of_a_list_does_not_depend_on_its_container(tiny):
    model, tok = tiny
    assert peft_lab.perplexity(model, tok, TEXTS) == peft_lab.perplexity(model, tok, tuple(TEXTS))
    assert peft_lab.encode_texts(TEXTS[:1], tok) == peft_lab.encode_texts((TEXTS[0],), tok)


def test_tied_lm_head_refused_and_model_untouched_untied_allowed():
    model = small_gpt2()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="tied"):
        peft_lab.apply_lora(model, target_modules=["c_attn", "lm_head"])
    assert not list(lora_layers(model)) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # LLaMA's lm_head is its own weight: allowed, and merging changes lm_head only, not the embedding.
    llama = small_llama()
    emb = llama.get_input_embeddings().weight.clone()
    peft_lab.apply_lora(llama, target_modules=["lm_head"])
    with torch.no_grad():
        for _, t in peft_lab.lora_state_dict(llama).items():
            t.normal_(0, 0.02)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    want = llama(ids).logits
    peft_lab.merge_lora(llama)
    assert_close(llama(ids).logits, want, reason="merged vs unmerged", what="merged lm_head logits")
    assert torch.equal(llama.get_input_embeddings().weight, emb)


def test_merge_inside_disable_refused_and_disabled_model_is_the_base():
    base = small_gpt2()
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    base_logits = base(ids).logits
    model = peft_lab.apply_lora(base, rank=2)
    with torch.no_grad():
        for _, t in peft_lab.lora_state_dict(model).items():
            t.normal_(0, 0.1)
    adapted = model(ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-4)
    with peft_lab.disable_lora(model):
        with pytest.raises(ValueError, match="merge_lora inside"):
            peft_lab.merge_lora(model)
        assert torch.equal(model(ids).logits, base_logits)
    assert torch.equal(model(ids).logits, adapted)


def test_string_target_is_a_regex_over_full_names():
    """The rule chosen: one string is a regular expression over the whole module name (PEFT's rule), so
    "c_attn" alone is refused with the hint to pass ["c_attn"]; a regex that matches gives the same layers."""
    by_list = [n for n, _ in lora_layers(peft_lab.apply_lora(small_gpt2(), target_modules=["c_attn"]))]
    by_regex = [n for n, _ in lora_layers(peft_lab.apply_lora(small_gpt2(), target_modules=r".*\.c_attn"))]
    assert by_list == by_regex and len(by_list) == 2


def test_numpy_and_tensor_numbers_are_accepted_and_stored_plain(tmp_path):
    model = peft_lab.apply_lora(small_gpt2(), rank=np.int64(2), alpha=np.float32(4.0), dropout=np.float64(0.0))
    config = peft_lab.lora_config(model)
    assert (config.rank, config.alpha, config.dropout) == (2, 4.0, 0.0)
    assert type(config.rank) is int and type(config.alpha) is float and type(config.dropout) is float
    out = peft_lab.export_peft_adapter(model, tmp_path / "a")
    written = json.loads((out / interop.CONFIG_NAME).read_text())
    assert written["r"] == 2 and written["lora_alpha"] == 4.0
    ex = [{"input_ids": list(range(i, i + 8))} for i in range(4)]
    hist = peft_lab.train(model, ex, steps=np.int64(2), batch_size=np.int64(2), lr=torch.tensor(1e-3),
                          eval_every=np.int64(1), eval_fn=lambda m: np.float32(0.5))
    assert hist.step == [1, 2] and hist.metric == [0.5] * 3 and type(hist.metric[0]) is float
    a = peft_lab.estimate_memory("gpt2", batch_size=np.int64(2), seq_len=np.int64(16))
    assert a == peft_lab.estimate_memory("gpt2", batch_size=2, seq_len=16)
    assert len(peft_lab.load_task("val", n=np.int64(3))) == 3
    ax = peft_lab.plot_parameters({"LoRA": np.int64(5), "full": torch.tensor(100)})
    assert [t.get_text() for t in ax.get_xticklabels()] == ["LoRA", "full"]


def test_edges_that_are_accepted():
    assert peft_lab.load_task("val", n=0) == []  # n=0 asks for nothing and gets nothing
    assert len(peft_lab.load_task("val", n=300)) == 300  # exactly the split's size
    context = peft_lab.estimate_memory("gpt2", seq_len=1024)  # exactly the context
    assert context == peft_lab.estimate_memory("gpt2")
    assert validate.require_path("path", "~/x") == Path.home() / "x"


def test_train_refuses_a_set_with_one_unsupervised_example(small_gpt2):
    ex = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 3 + [{"input_ids": [4, 5], "labels": [4, -100]}]
    with pytest.raises(ValueError, match=r"examples\[3\] has no supervised token"):
        peft_lab.train(small_gpt2, ex, steps=1, batch_size=1)
    hist = peft_lab.train(small_gpt2, ex[:3], steps=2, batch_size=1)
    assert all(np.isfinite(hist.loss))


def test_pick_device_refuses_cuda_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda'.*no CUDA"):
        peft_lab.pick_device("cuda")
    assert peft_lab.pick_device("cpu") == torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------
# Part 3: failed calls change nothing; saves are atomic
# ---------------------------------------------------------------------------------------------------------

def _snapshot(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [(n, id(m), type(m)) for n, m in model.named_modules()], model.training)


def _same(model, snap):
    values, flags, modules, training = snap
    now = _snapshot(model)
    return (now[0].keys() == values.keys() and all(torch.equal(now[0][k], values[k]) for k in values)
            and now[1] == flags and now[2] == modules and now[3] == training)


def test_failed_import_leaves_the_model_exactly_as_it_came(tmp_path):
    source = peft_lab.apply_lora(small_gpt2(), rank=4)
    folder = peft_lab.export_peft_adapter(source, tmp_path / "adapter")
    model = small_gpt2(width=32)  # another size: shapes do not fit
    for name, p in model.named_parameters():  # an unusual pattern, to see it kept
        p.requires_grad_("h.0." in name)
    model.train()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="shape mismatch"):
        peft_lab.import_peft_adapter(model, folder)
    assert _same(model, snap)
    assert peft_lab.core.get_config(model, "lora") is None


def _fill_folder(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("existing", [False, True], ids=["new folder", "existing folder"])
def test_export_failing_midway_leaves_the_folder_as_it_was(tmp_path, monkeypatch, existing):
    import safetensors.torch
    model = peft_lab.apply_lora(small_gpt2(), rank=2)
    target = tmp_path / "deep" / "adapter"
    if existing:
        peft_lab.export_peft_adapter(peft_lab.apply_lora(small_gpt2(seed=5), rank=2), target)
        (target / "README.md").write_text("mine")
    before = _fill_folder(target) if existing else None
    snap = _snapshot(model)

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        peft_lab.export_peft_adapter(model, target)
    if existing:
        assert _fill_folder(target) == before
        assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["adapter"]  # no temp folder left
    else:
        assert not (tmp_path / "deep").exists()  # nothing created, not even the parent
    assert _same(model, snap)
    monkeypatch.undo()
    peft_lab.export_peft_adapter(model, target)  # works afterwards, and keeps the folder's other files
    assert (target / interop.WEIGHTS_NAME).is_file()
    assert not existing or (target / "README.md").read_text() == "mine"


def test_export_expands_home_and_refuses_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    model = peft_lab.apply_lora(small_gpt2(), rank=2)
    out = peft_lab.export_peft_adapter(model, "~/adapters/x")
    assert out == tmp_path / "home" / "adapters" / "x" and (out / interop.CONFIG_NAME).is_file()
    assert not (tmp_path / "~").exists()
    with pytest.raises(ValueError, match="path"):
        peft_lab.export_peft_adapter(model, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]  # nothing written to the working directory
    again = peft_lab.import_peft_adapter(small_gpt2(), "~/adapters/x")
    assert torch.equal(peft_lab.lora_state_dict(again)["transformer.h.0.attn.c_attn.lora_A.weight"],
                       peft_lab.lora_state_dict(model)["transformer.h.0.attn.c_attn.lora_A.weight"])


def test_atomic_text_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_text_atomic(path, "old\n")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("interrupted")))
    with pytest.raises(OSError, match="interrupted"):
        write_text_atomic(path, "new\n")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_record_and_write_jsonl_change_nothing_on_bad_values(tmp_path, monkeypatch):
    results = tmp_path / "results.json"
    monkeypatch.setenv("PEFT_LAB_RESULTS", str(results))
    assert peft_lab.record("a", np.float32(0.5)) == np.float32(0.5)
    with pytest.raises(TypeError, match="value"):
        peft_lab.record("b", object())
    assert json.loads(results.read_text()) == {"a": 0.5}
    rows = tmp_path / "rows.jsonl"
    write_jsonl([{"x": 1}], rows)
    with pytest.raises(TypeError):
        write_jsonl([{"x": 2}, {"x": object()}], rows)
    assert rows.read_text() == '{"x": 1}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["results.json",
                                                                                               "rows.jsonl"]
    assert rows.stat().st_mode & 0o777 != 0o600  # the usual permissions, not mkstemp's private ones


# ---------------------------------------------------------------------------------------------------------
# Every loader: a failed call leaves values, requires_grad, modules, train mode and config records as they were
# ---------------------------------------------------------------------------------------------------------

def _full_snapshot(model):
    records = {k: v for k, v in vars(model).items() if k.startswith("_peft_lab_")}
    return _snapshot(model), [(n, m.training) for n, m in model.named_modules()], records


def _unusual(model):
    """A model in a state no loader would produce by itself: some parameters trainable, one block in eval."""
    for name, p in model.named_parameters():
        p.requires_grad_("h.0." in name)
    model.train()
    model.transformer.h[1].eval()
    return model


def _break_weights(file: Path) -> None:
    """Rewrite a safetensors file (same metadata) with its last tensor of the wrong shape: it fits no model,
    and a loader that copied as it checked would already have copied the others."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(file), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors[sorted(tensors)[-1]] = torch.zeros(1, 1)
    save_file(tensors, str(file), metadata=meta)


def _peft_folder(method, tmp):
    apply = {"lora": lambda m: peft_lab.apply_lora(m, rank=2), "ia3": peft_lab.apply_ia3,
             "dora": lambda m: peft_lab.apply_lora(m, rank=2, use_dora=True),
             "prefix": lambda m: peft_lab.apply_prefix_tuning(m, 3),
             "prompt": lambda m: peft_lab.apply_prompt_tuning(m, 3)}[method]
    folder = peft_lab.export_peft_adapter(apply(small_gpt2()), tmp / method)
    _break_weights(folder / "adapter_model.safetensors")
    return folder


def _adapters_file(tmp):
    path = peft_lab.save_adapters(peft_lab.apply_adapters(small_gpt2(), reduction_factor=4), tmp / "a.safetensors")
    _break_weights(path)
    return path


def _hub_folder(tmp):
    folder = peft_lab.export_adapterhub_adapter(peft_lab.apply_adapters(small_gpt2(), reduction_factor=4),
                                                tmp / "hub", "task")
    _break_weights(folder / "adapter.safetensors")
    return folder


LOADERS = {
    "import_peft_adapter LoRA": (lambda t: small_gpt2(),
                                 lambda m, t: peft_lab.import_peft_adapter(m, _peft_folder("lora", t))),
    "import_peft_adapter IA3": (lambda t: small_gpt2(),
                                lambda m, t: peft_lab.import_peft_adapter(m, _peft_folder("ia3", t))),
    "import_peft_adapter DoRA": (lambda t: small_gpt2(),
                                 lambda m, t: peft_lab.import_peft_adapter(m, _peft_folder("dora", t))),
    "import_peft_adapter prefix": (lambda t: small_gpt2(),
                                   lambda m, t: peft_lab.import_peft_adapter(m, _peft_folder("prefix", t))),
    "import_peft_adapter prompt": (lambda t: small_gpt2(),
                                   lambda m, t: peft_lab.import_peft_adapter(m, _peft_folder("prompt", t))),
    "load_adapters into a plain model": (lambda t: small_gpt2(),
                                         lambda m, t: peft_lab.load_adapters(m, _adapters_file(t))),
    "load_adapters into adapters": (lambda t: peft_lab.apply_adapters(small_gpt2(), reduction_factor=4, init="bert"),
                                    lambda m, t: peft_lab.load_adapters(m, _adapters_file(t))),
    "import_adapterhub_adapter": (lambda t: small_gpt2(),
                                  lambda m, t: peft_lab.import_adapterhub_adapter(m, _hub_folder(t))),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_failed_load_leaves_the_model_exactly_as_it_came(tmp_path, loader):
    make, load = LOADERS[loader]
    model = _unusual(make(tmp_path))
    snap = _full_snapshot(model)
    with pytest.raises(ValueError, match="missing keys|shape"):
        load(model, tmp_path)
    after = _full_snapshot(model)
    assert _same(model, snap[0]) and after[1] == snap[1] and after[2] == snap[2]


def test_load_adapters_refuses_a_file_with_other_settings_and_applies_them_to_a_plain_model(tmp_path):
    """A file saved with gelu and scaling 2 would compute another function in a relu/scaling-1 model."""
    source = peft_lab.apply_adapters(small_gpt2(), reduction_factor=4, nonlinearity="gelu", scaling=2, init="bert")
    path = peft_lab.save_adapters(source, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="nonlinearity: file 'gelu', model 'relu'.*scaling: file 2.0, model 1.0"):
        peft_lab.load_adapters(peft_lab.apply_adapters(small_gpt2(), reduction_factor=4), path)
    loaded = peft_lab.load_adapters(small_gpt2(), path)
    assert torch.equal(loaded(IDS).logits, source(IDS).logits)


@pytest.mark.parametrize("writer", ["save_adapters", "export_peft_adapter", "export_adapterhub_adapter",
                                    "write_text_atomic"])
def test_files_and_folders_keep_the_process_umask(tmp_path, writer):
    old = os.umask(0o027)
    try:
        model = peft_lab.apply_adapters(small_gpt2(), reduction_factor=4)
        if writer == "save_adapters":
            written = [peft_lab.save_adapters(model, tmp_path / "new" / "a.safetensors")]
        elif writer == "export_peft_adapter":
            folder = peft_lab.export_peft_adapter(peft_lab.apply_lora(small_gpt2(), rank=2), tmp_path / "new" / "p")
            written = [folder, *folder.iterdir()]
        elif writer == "export_adapterhub_adapter":
            folder = peft_lab.export_adapterhub_adapter(model, tmp_path / "new" / "h", "task")
            written = [folder, *folder.iterdir()]
        else:
            write_text_atomic(tmp_path / "new" / "t.txt", "x")
            written = [tmp_path / "new" / "t.txt"]
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in [tmp_path / "new", *written]}
    assert modes == {p.name: ("0o750" if p.is_dir() else "0o640") for p in [tmp_path / "new", *written]}


def test_adapterhub_export_failing_midway_keeps_the_old_pair(tmp_path, monkeypatch):
    import safetensors.torch
    folder = peft_lab.export_adapterhub_adapter(peft_lab.apply_adapters(small_gpt2(), reduction_factor=4),
                                                tmp_path / "hub", "task")
    (folder / "notes.txt").write_text("kept")
    before = _fill_folder(folder)
    other = peft_lab.apply_adapters(small_gpt2(), reduction_factor=2)

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        peft_lab.export_adapterhub_adapter(other, folder, "task")
    assert _fill_folder(folder) == before and sorted(p.name for p in tmp_path.iterdir()) == ["hub"]
    monkeypatch.undo()
    peft_lab.export_adapterhub_adapter(other, folder, "task")  # a complete new pair, the other file kept
    after = _fill_folder(folder)
    assert after["notes.txt"] == b"kept" and after["adapter.safetensors"] != before["adapter.safetensors"]


def test_rollback_undoes_every_kind_of_change():
    """What any loader might do inside core.rollback_on_error, undone when it raises: modules swapped,
    parameters frozen, train/eval switched, a config recorded, an existing adapter's values overwritten."""
    model = _unusual(peft_lab.apply_lora(small_gpt2(), rank=2))
    core.fill_seeded(peft_lab.lora_state_dict(model), 3, 0.1)
    snap, values = _full_snapshot(model), {k: t.clone() for k, t in peft_lab.lora_state_dict(model).items()}
    with pytest.raises(RuntimeError, match="midway"):
        with core.rollback_on_error(model):
            core.replace_module(model, "transformer.h.0.mlp", nn.Identity())
            core.freeze(model)
            model.eval()
            core.record_config(model, "adapters", "settings")
            for t in peft_lab.lora_state_dict(model).values():
                t.zero_()
            raise RuntimeError("midway")
    after = _full_snapshot(model)
    assert _same(model, snap[0]) and after[1] == snap[1] and after[2] == snap[2]
    assert all(torch.equal(t, values[k]) for k, t in peft_lab.lora_state_dict(model).items())
