"""`adapter_rows`: several LoRA adapters in one batch, one per row, as the scheduler runs them (decode:
(B, 1, C) over all running rows; prefill: one sequence (1, T, C)). Each row must get exactly what that
adapter alone gives it (`set_adapter`), and rows naming no adapter the base."""

from __future__ import annotations

import pytest
import torch

from lmforge.models.decoder import Decoder, config_from_preset
from lmforge.nn import lora

V = 64


def two_adapter_model() -> Decoder:
    torch.manual_seed(0)
    model = Decoder(config_from_preset("tiny", vocab_size=V, block_size=32)).eval()
    lora.add_lora(model, lora.LoRASettings(r=4, alpha=8), name="a")  # every linear
    lora.add_lora(model, lora.LoRASettings(r=2, targets="q,v"), name="b")  # some rows of qkv only
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def alone(model: Decoder, name: str | None, idx_BT: torch.Tensor) -> torch.Tensor:
    lora.set_adapter(model, name)
    try:
        return model(idx_BT)
    finally:
        lora.set_adapter(model, None)


@torch.no_grad()
def test_rows_of_a_mixed_batch_equal_each_adapter_alone():
    model = two_adapter_model()
    idx_BT = torch.randint(0, V, (5, 7), generator=torch.Generator().manual_seed(2))
    names = ["b", None, "a", "b", "a"]
    refs = {n: alone(model, n, idx_BT) for n in (None, "a", "b")}
    assert (refs["a"] - refs[None]).abs().max() > 1e-2 and (refs["b"] - refs[None]).abs().max() > 1e-2
    with lora.adapter_rows(model, names):
        mixed = model(idx_BT)
    for b, n in enumerate(names):
        torch.testing.assert_close(mixed[b], refs[n][b], atol=1e-5, rtol=0)
    torch.testing.assert_close(model(idx_BT), refs[None], atol=0, rtol=0)  # gone after the block


@torch.no_grad()
@pytest.mark.parametrize("names", [["a"], [None], ["b", "b", "b"], [None, None]])
def test_one_adapter_on_every_row_and_the_prefill_shape(names):
    model = two_adapter_model()
    idx_BT = torch.randint(0, V, (len(names), 9), generator=torch.Generator().manual_seed(3))
    with lora.adapter_rows(model, names):
        got = model(idx_BT)
    torch.testing.assert_close(got, alone(model, names[0], idx_BT), atol=1e-6, rtol=0)


@torch.no_grad()
def test_decode_rows_with_a_kv_cache_equal_each_adapter_alone():
    """The scheduler's decode step: one new token per row (B, 1) on a cache holding each row's prompt."""
    model = two_adapter_model()
    names = ["a", None, "b"]
    prompt_BT = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(4))
    next_B1 = torch.randint(0, V, (3, 1), generator=torch.Generator().manual_seed(5))
    cache = model.new_cache(3, 16)
    for b, n in enumerate(names):  # prefill one row at a time, (1, T)
        with lora.adapter_rows(model, [n]):
            model(prompt_BT[b:b + 1], cache=cache.rows(b, b + 1))
    with lora.adapter_rows(model, names):
        step = model(next_B1, cache=cache.rows(0, 3))[:, -1]
    full_BT = torch.cat([prompt_BT, next_B1], dim=1)
    for b, n in enumerate(names):
        torch.testing.assert_close(step[b], alone(model, n, full_BT[b:b + 1])[0, -1], atol=1e-5, rtol=0)


def test_a_batch_of_another_size_is_refused():
    model = two_adapter_model()
    with lora.adapter_rows(model, ["a", "b"]):
        with pytest.raises(ValueError, match="^adapter_rows named 2 rows, the batch has 3$"):
            model(torch.zeros(3, 4, dtype=torch.long))


def test_a_second_adapter_goes_on_the_models_linears_not_on_the_first_adapters():
    model = two_adapter_model()
    wrapped = sorted(lora.lora_modules(model))
    assert wrapped == sorted(n for n in lora.linear_roles(model)
                             if n.split(".")[-1] != "lm_head")  # "a" is on all-linear, "b" on qkv only
    assert not any(".adapters." in n for n in lora.linear_roles(model))
    assert sorted(model.get_submodule("blocks.0.attn.qkv").adapters) == ["a", "b"]
