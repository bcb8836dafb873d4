"""peft_lab.scale_out: the methods trained sharded with FSDP2 on 2 CPU ranks equal one process (notebook 07).

Two launches serve the whole file (starting ranks costs seconds): 2 ranks run LoRA with SGD and with AdamW,
adapters, prefix tuning and full fine-tuning; 1 rank runs the two LoRA jobs again as the reference.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peft_lab import import_peft_adapter, load_base_model, train
from peft_lab.data import encode_task, load_task
from peft_lab.interop import read_adapter_weights
from peft_lab.lora import apply_lora
from peft_lab.scale_out import (
    Job,
    communication_per_step,
    fsdp_elements_per_rank,
    launch,
    main,
    shard_rows,
    train_with_accelerate,
    zero_bytes_per_rank,
)
from peft_lab.tolerance import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, SGD_LR = 4, 0.5
LORA = {"kind": "lora", "rank": 8, "targets": ["c_attn"]}
# Adam's first steps are ≈ lr·sign(g): a gradient entry within rounding of 0 may flip sign when the sum order
# changes, which moves that weight by up to 2·lr — no float32 bound holds for the weights after AdamW (a
# 2-way split of the same batch in one process does the same). SGD's update is linear in the gradient, so
# its weights inherit only the gradient's reordering: that is the comparison of the weights.
REASON = "2 ranks sum their halves of the batch, then FSDP's reduce-scatter adds the two partial gradients"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale_out")
    lora_jobs = lambda n: [Job("lora", STEPS, optimizer="sgd", lr=SGD_LR, out=str(root / f"sgd{n}")),
                           Job("lora", STEPS, out=str(root / f"adamw{n}"))]
    two = launch(lora_jobs(2) + [Job(m, 2, batch_size=4, out=str(root / m)) for m in ("adapters", "prefix", "full")],
                 nproc=2)
    one = launch(lora_jobs(1), nproc=1)
    return root, dict(zip(["sgd", "adamw", "adapters", "prefix", "full"], two)), dict(zip(["sgd", "adamw"], one))


def test_two_ranks_train_the_same_lora_adapter_as_one_process(runs):
    root, two, one = runs
    a, b = read_adapter_weights(root / "sgd2" / "adapter"), read_adapter_weights(root / "sgd1" / "adapter")
    assert a.keys() == b.keys() and len(a) == 8
    for k in a:
        assert_close(a[k], b[k], reason=REASON, what=k)
    assert all(b[k].abs().max() > 0 for k in b if "lora_B" in k)  # B starts at 0: the adapter did train
    for kind in ("sgd", "adamw"):
        assert_close(torch.tensor(two[kind]["ranks"][0]["losses"]), torch.tensor(one[kind]["ranks"][0]["losses"]),
                     reason=REASON, what=f"{kind} loss curve")


def test_one_rank_follows_the_plain_training_loop(runs):
    """``--nproc 1`` draws the batches of peft_lab.train and normalises the loss as it does: same losses."""
    _, _, one = runs
    torch.manual_seed(0)
    model, tok = load_base_model("tiny", device="cpu")
    apply_lora(model, rank=8, alpha=16)
    history = train(model, encode_task(load_task("train", n=64), tok), steps=STEPS, batch_size=8, lr=1e-2, seed=0,
                    pad_id=tok.eos_token_id, progress=False)
    assert_close(torch.tensor(one["adamw"]["ranks"][0]["losses"]), torch.tensor(history.loss),
                 reason="transformers' mean loss vs our sum / count; FSDP's flat parameters", what="loss curve")


def test_each_rank_holds_half_of_what_one_process_holds(runs):
    _, two, one = runs
    whole = one["adamw"]["ranks"][0]
    model = apply_lora(load_base_model("tiny", device="cpu")[0], rank=8, alpha=16)
    exact = fsdp_elements_per_rank(model, 2)
    predicted = zero_bytes_per_rank("tiny", 2, 3, method=LORA, trainable_params=whole["trainable_elements"])
    for rank in two["adamw"]["ranks"]:
        assert rank["parameter_elements"] == exact[rank["rank"]]
        assert rank["parameter_bytes"] * 2 == whole["parameter_bytes"] == 4 * 957_184
        assert (rank["parameter_bytes"], rank["gradient_bytes"], rank["optimizer_bytes"]) == (
            predicted["parameters"], predicted["gradients"], predicted["optimizer"])
    one_process = zero_bytes_per_rank("tiny", 1, 3, method=LORA, trainable_params=whole["trainable_elements"])
    assert (whole["parameter_bytes"], whole["gradient_bytes"], whole["optimizer_bytes"]) == (
        one_process["parameters"], one_process["gradients"], one_process["optimizer"])


def test_full_fine_tuning_shards_all_three_states(runs):
    root, two, _ = runs
    predicted = zero_bytes_per_rank("tiny", 2, 3)
    for rank in two["full"]["ranks"]:
        assert (rank["parameter_bytes"], rank["gradient_bytes"], rank["optimizer_bytes"]) == (
            predicted["parameters"], predicted["gradients"], predicted["optimizer"])
    from transformers import AutoModelForCausalLM
    trained = AutoModelForCausalLM.from_pretrained(root / "full" / "model")
    base = load_base_model("tiny", device="cpu")[0]
    assert not torch.equal(trained.lm_head.weight, base.lm_head.weight)  # it trained, and saved the result


def test_communication_formula_matches_the_collectives_fsdp_issued(runs):
    _, two, _ = runs
    for kind, kw in (("adamw", dict(method=LORA, trainable_params=16_384)), ("full", {})):
        seen = two[kind]["ranks"][0]["collectives_last_step"]
        assert seen["all_gathers"] == 2 * 4 + 1  # each of 4 blocks before forward and backward, the root once
        predicted = communication_per_step("tiny", 2, 3, **kw)
        assert seen["all_gather_bytes"] / 2 == predicted["all_gather"]       # a rank receives (n−1)/n of it
        assert seen["reduce_scatter_bytes"] / 2 == predicted["reduce_scatter"]


def test_adapters_and_prefix_train_sharded_and_load(runs):
    root, two, _ = runs
    for kind in ("adapters", "prefix", "full"):
        ranks = two[kind]["ranks"]
        assert sum(r["parameter_elements"] for r in ranks) == ranks[0]["total_elements"]
        assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in ranks)
    from peft_lab.adapters import load_adapters
    load_adapters(load_base_model("tiny", device="cpu")[0], root / "adapters" / "adapters.safetensors")
    prefix = import_peft_adapter(load_base_model("tiny", device="cpu")[0], root / "prefix" / "adapter")
    ids = torch.tensor([[5, 6, 7]])
    assert torch.isfinite(prefix(input_ids=ids).logits).all()


def test_peft_loads_the_adapter_two_ranks_wrote(runs):
    from peft import PeftModel
    root, _, _ = runs
    ours = import_peft_adapter(load_base_model("tiny", device="cpu")[0], root / "adamw2" / "adapter").eval()
    theirs = PeftModel.from_pretrained(load_base_model("tiny", device="cpu")[0], root / "adamw2" / "adapter").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits,
                     reason="PEFT computes the LoRA branch in its own order", what="logits")


def test_report_json_has_every_field(runs):
    root, _, _ = runs
    report = json.loads((root / "adamw2" / "report.json").read_text())
    assert report["nproc"] == 2 and len(report["ranks"]) == 2
    for rank in report["ranks"]:
        for field in ("parameter_bytes", "gradient_bytes", "optimizer_bytes", "step_seconds", "final_loss"):
            assert field in rank
        assert len(rank["step_seconds"]) == STEPS and rank["optimizer_bytes"] > 0


def test_accelerate_path_equals_the_fsdp_reference(runs, tmp_path):
    """train_with_accelerate (the GPU path) in one plain CPU process: the same weights as --nproc 1."""
    from accelerate.state import AcceleratorState
    root, _, _ = runs
    try:
        train_with_accelerate(Job("lora", STEPS, optimizer="sgd", lr=SGD_LR, out=str(tmp_path)))
    finally:
        AcceleratorState._reset_state(True)
    a, b = read_adapter_weights(tmp_path / "adapter"), read_adapter_weights(root / "sgd1" / "adapter")
    for k in b:
        assert_close(a[k], b[k], reason="FSDP keeps flat parameter copies and runs world-of-one collectives", what=k)


# ---------------------------------------------------------------------------------------------------------
# The arithmetic and the refusals (no processes started)
# ---------------------------------------------------------------------------------------------------------

def test_arithmetic_lesson_with_lora_the_base_is_what_sharding_saves():
    t = 4_194_304  # LoRA r=8 on q_proj, v_proj of LLaMA-7B (compare.trainable_count)
    lora = {"kind": "lora", "rank": 8, "targets": ["q_proj", "v_proj"]}
    dp, z2, z3 = (zero_bytes_per_rank("llama-7b", 8, s, method=lora, trainable_params=t, precision="bf16-mixed")
                  for s in (0, 2, 3))
    assert z2["total"] > 0.99 * dp["total"]          # sharding gradients and optimizer state saves < 1%
    assert z3["total"] < dp["total"] / 7.9           # sharding the frozen base saves nearly 8×
    full = [zero_bytes_per_rank("llama-7b", 8, s, precision="bf16-mixed")["total"] for s in (0, 1, 2, 3)]
    assert full == sorted(full, reverse=True) and full[3] * 8 == pytest.approx(full[0])
    assert [shard_rows(5, 2, r) for r in (0, 1)] == [3, 2] and [shard_rows(2, 4, r) for r in range(4)] == [1, 1, 0, 0]


@pytest.mark.parametrize("call, error, words", [
    (lambda: launch([Job(batch_size=7)], 2), ValueError, ["batch_size=7", "nproc=2"]),
    (lambda: launch([Job(method="vera")], 1), ValueError, ["method"]),
    (lambda: launch([Job(steps=0)], 1), ValueError, ["steps"]),
    (lambda: launch([Job(lr=-1.0)], 1), ValueError, ["lr"]),
    (lambda: launch([Job()], 0), ValueError, ["nproc"]),
    (lambda: launch([], 1), ValueError, ["Job"]),
    (lambda: launch([Job(batch_size=128)], 1), ValueError, ["batch_size=128"]),
    (lambda: launch([Job()], 1, start_method="thread"), ValueError, ["start_method"]),
    (lambda: launch([Job(out=__file__)], 1), FileExistsError, ["out=", "folder"]),
    (lambda: zero_bytes_per_rank("tiny", 2, 4), ValueError, ["stage"]),
    (lambda: zero_bytes_per_rank("tiny", 0), ValueError, ["ranks"]),
    (lambda: communication_per_step("tiny", 2, 5), ValueError, ["stage"]),
])
def test_bad_inputs_are_refused_before_any_process_starts(call, error, words):
    """Each refusal names the argument; the ranks never start (a launch takes seconds)."""
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value)


def test_command_line_refuses_an_unknown_method(capsys):
    with pytest.raises(SystemExit):
        main(["--method", "vera", "--out", "x"])
    assert "invalid choice" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# The committed configs for GPUs: parsed by Accelerate's own code, nothing launched
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture()
def configs(monkeypatch):
    """The configs' folder; the working directory is the repository root, as the documented command needs."""
    import peft_lab
    folder = Path(peft_lab.__file__).parent / "configs"
    monkeypatch.chdir(folder.parent.parent)
    return folder


def _launch_args(config: str):
    """What ``accelerate launch --config_file <config> -m peft_lab.scale_out --accelerate`` resolves to."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    args = launch_command_parser().parse_args(["--config_file", config, "-m", "peft_lab.scale_out", "--accelerate"])
    return _validate_launch_command(args)[0]


def test_accelerate_accepts_the_fsdp_config(monkeypatch, configs):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    args = _launch_args(str(configs / "accelerate_fsdp_lora.yaml"))
    assert args.use_fsdp and args.mixed_precision == "bf16" and args.fsdp_version == 2
    env = prepare_multi_gpu_env(args)  # the environment accelerate launch gives each rank
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # reads that environment, as Accelerator() does on a GPU rank
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_accelerate_accepts_the_deepspeed_zero3_config(configs):
    """deepspeed is not installed here: the config is read by Accelerate's DeepSpeedPlugin (which checks
    it has a ZeRO section and fills its stage, clipping and offload fields from it) and its keys are checked
    against those Accelerate reads or fills — not by DeepSpeed itself."""
    from accelerate.utils import DeepSpeedPlugin
    args = _launch_args(str(configs / "accelerate_deepspeed_zero3.yaml"))
    assert args.use_deepspeed and args.mixed_precision == "bf16"
    path = configs.parent.parent / args.deepspeed_config_file  # relative to the repository root
    plugin = DeepSpeedPlugin(hf_ds_config=str(path))
    assert plugin.zero_stage == 3 and plugin.hf_ds_config.is_zero3() and plugin.gradient_clipping == 1.0
    config = json.loads(path.read_text())
    known = {"bf16", "zero_optimization", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size",
             "train_micro_batch_size_per_gpu"}
    assert set(config) <= known
    assert config["bf16"]["enabled"] is True and config["zero_optimization"]["stage"] == 3


def test_ia3_dora_qlora_shard_and_qlora_keeps_its_4bit_buffers_whole():
    """Every method's parameters split over the ranks; QLoRA's packed NF4 weights are buffers, which fully_shard
    leaves whole: each rank holds all of them (notebook 07 §4)."""
    reports = launch([Job(m, 2, batch_size=4) for m in ("ia3", "dora", "qlora")], 2)
    for method, report in zip(("ia3", "dora", "qlora"), reports):
        ranks = report["ranks"]
        assert sum(r["parameter_elements"] for r in ranks) == ranks[0]["total_elements"], method
        assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in ranks), method
    qlora = reports[2]["ranks"]
    from peft_lab.qlora import nf4_layers, quantize_model
    model, _ = load_base_model("tiny", device="cpu")
    # the model's own buffers (transformers 4.57's GPT-2 keeps causal-mask buffers; 5.x none) are whole on each rank
    plain = sum(b.numel() * b.element_size() for b in model.buffers())
    quantize_model(model)
    whole = sum(b.numel() * b.element_size() for b in model.buffers())
    assert whole > plain and [r["buffer_bytes"] for r in qlora] == [whole, whole]
    assert all(r["buffer_bytes"] == plain for report in reports[:2] for r in report["ranks"])
    assert len(nf4_layers(model)) > 0
