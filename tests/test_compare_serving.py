"""compare.ready_for_inference: the served copy computes what the trained model computes, and is merged."""
import copy

import pytest
import torch

from peft_lab import compare, ia3, lora
from peft_lab.tolerance import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["LoRA r=8", "Houlsby", "prefix", "PEFT IA3", "IA3", "DoRA r=8", "QLoRA r=8"])
def test_served_copy_gives_the_trained_logits(tiny, name):
    base, tok = tiny
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    model = compare.METHODS[name].apply(copy.deepcopy(base), tok)
    for p in model.parameters():  # away from the identity initialisation, as after training
        if p.requires_grad:
            with torch.no_grad():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    served = compare.ready_for_inference(name, model)
    with torch.no_grad():
        assert_close(served(input_ids=ids).logits, model(input_ids=ids).logits,
                     reason="merging or folding computes the same sums in another order")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the trained model is untouched
    if name in ("LoRA r=8", "DoRA r=8"):
        assert all(layer.merged for _, layer in lora.lora_layers(served))
    if name == "QLoRA r=8":                    # the NF4 base takes no float update: served unmerged
        assert not any(layer.merged for _, layer in lora.lora_layers(served))
    if name == "IA3":
        layers = [layer for _, layer in ia3.ia3_layers(served)]
        assert layers and all(layer.merged for layer in layers)
    if name == "PEFT IA3":
        assert not any("ia3_l" in n for n, _ in served.named_parameters())
    assert compare.served_as(name) == {"LoRA r=8": "merged", "PEFT IA3": "merged", "Houlsby": "as trained",
                                       "prefix": "projection folded", "IA3": "merged", "DoRA r=8": "merged",
                                       "QLoRA r=8": "as trained"}[name]
