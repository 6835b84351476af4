"""Padding-free micro-batches train on the same samples with the same loss as the padded reference."""

from __future__ import annotations

import pytest

from tests.conftest import tiny_run_config

# The reference's 4-bit base (fp4, float32 compute: LoRA trains in float32) and the fast profile's (nf4,
# bfloat16 compute: trl trains LoRA in bf16; profiles/fast.toml, the profile that turns padding-free on).
BASES = {"fp4-float32": ("fp4", "float32"), "nf4-bfloat16": ("nf4", "bfloat16")}


@pytest.fixture(scope="module", params=list(BASES))
def setup(request, tiny_model_dir, demo_data_file):
    from fedtune.config import FedTuneConfig
    from fedtune.dataset import load_node_dataset
    from fedtune.model import adapter_state, load_tokenizer, load_trainable_model

    quant_type, compute_dtype = BASES[request.param]
    # no LoRA dropout: its masks are drawn per micro-batch, so with it the later steps of differently
    # batched runs legitimately drift apart; without it every step must agree
    cfg = FedTuneConfig.from_run_config(
        tiny_run_config(
            tiny_model_dir,
            **{
                "train.max-steps": 3,
                "model.lora.dropout": 0.0,
                "model.quant-type": quant_type,
                "model.compute-dtype": compute_dtype,
            },
        )
    )
    tokenizer = load_tokenizer(cfg.model)
    model = load_trainable_model(cfg.model, "cpu")
    trainset, _ = load_node_dataset(cfg.dataset.name, {"data-path": str(demo_data_file)}, 1)
    return cfg, tokenizer, model, trainset.select(range(64)), adapter_state(model)


def train(setup, **overrides):
    from dataclasses import replace

    from clientapp.trainer import train_one_round
    from fedtune.model import adapter_state, load_adapter_state

    cfg, tokenizer, model, trainset, initial = setup
    load_adapter_state(model, initial)
    settings = replace(cfg.train, **overrides)
    outcome = train_one_round(model, tokenizer, trainset, settings, 3e-3, "cpu", True)
    return outcome, adapter_state(model)


def test_padding_free_matches_padded_reference(setup):
    reference, _ = train(setup)  # micro-batch 1 × accumulation 4, padded
    padded4, _ = train(setup, per_device_train_batch_size=4, gradient_accumulation_steps=1)
    free4, _ = train(setup, per_device_train_batch_size=4, gradient_accumulation_steps=1, padding_free=True)
    assert reference.steps == free4.steps == 3
    # same samples, same token-weighted loss per optimizer step
    assert free4.tokens == reference.tokens == padded4.tokens
    for ref, pad, free in zip(reference.loss_history, padded4.loss_history, free4.loss_history, strict=True):
        assert free == pytest.approx(ref, rel=2e-3)
        assert pad == pytest.approx(ref, rel=2e-3)


def test_adapter_state_is_a_snapshot(setup):
    """The initial state every run above starts from must not follow training: with float32 compute the
    LoRA parameters are float32 CPU tensors, and a snapshot that aliased them (as `.float().cpu()` does)
    made every later run start from the previous run's trained adapter (fp4/float32: padding-free 10.56,
    compiled 11.73 vs padded 13.08 at step 1, with nothing wrong in padding-free or compile)."""
    import torch

    from fedtune.model import adapter_state

    _cfg, _tokenizer, model, _trainset, _initial = setup
    snapshot = adapter_state(model)
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    before = {k: v.clone() for k, v in snapshot.items()}
    with torch.no_grad():
        lora[0].add_(1.0)
    try:
        for key, value in snapshot.items():
            assert torch.equal(value, before[key]), key
    finally:
        with torch.no_grad():
            lora[0].sub_(1.0)


def test_padding_free_keeps_samples_apart(setup):
    """Attention must stay within each sample of the concatenated row: the loss of a padding-free batch of
    4 equals the mean of the 4 samples trained alone (token-weighted), not something mixed."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    _cfg, tokenizer, model, trainset, initial = setup
    import torch

    from fedtune.model import load_adapter_state

    load_adapter_state(model, initial)
    rows = [
        {
            "input_ids": tokenizer.apply_chat_template(
                r["prompt"] + r["completion"], tokenize=True, return_dict=True
            )["input_ids"][:64]
        }
        for r in trainset.select(range(4))
    ]
    free = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(rows)
    model.eval()
    with torch.no_grad():
        joint = model(**{k: v for k, v in free.items() if k in ("input_ids", "labels", "position_ids")})
        total, count = 0.0, 0
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            out = model(input_ids=ids, labels=ids)
            total += out.loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    model.train()
    assert joint.loss.item() == pytest.approx(total / count, rel=1e-3)


def test_bf16_transport_is_lossless_when_lora_trains_in_bf16(setup):
    """profiles/fast.toml sends its adapter as bf16 bits (`model.transport-dtype`). With bf16 compute trl
    trains the LoRA weights in bf16, so that changes nothing: the trained update is exactly representable
    (uplink), and a global rounded to bf16 by the server trains the same round as the float32 global the
    node would round itself (downlink). With float32 compute (the reference) bf16 would lose bits: the
    reference keeps float32."""
    from collections import OrderedDict

    import torch

    from clientapp.trainer import train_one_round
    from fedtune.model import adapter_state, arrays_to_state, load_adapter_state, state_to_arrays

    cfg, tokenizer, model, trainset, initial = setup

    def train_from(state):
        load_adapter_state(model, state)
        outcome = train_one_round(model, tokenizer, trainset, cfg.train, 3e-3, "cpu", True)
        return outcome.loss_history, adapter_state(model)

    def via_bf16(state):
        return arrays_to_state(state_to_arrays(state, "bfloat16"))

    gen = torch.Generator().manual_seed(1)
    # a global no bf16 can hold exactly, as the server's float32 average of two nodes' updates is
    global_fp32 = OrderedDict(
        (k, v + 1e-3 * torch.randn(v.shape, generator=gen) + 1e-7) for k, v in initial.items()
    )
    assert any(not torch.equal(via_bf16(global_fp32)[k], v) for k, v in global_fp32.items())
    losses, trained = train_from(global_fp32)
    uplink_exact = all(torch.equal(via_bf16(trained)[k], v) for k, v in trained.items())
    if cfg.model.compute_dtype == "bfloat16":
        assert uplink_exact
        losses_bf16, trained_bf16 = train_from(via_bf16(global_fp32))
        assert losses_bf16 == losses
        for key, value in trained.items():
            assert torch.equal(trained_bf16[key], value), key
    else:
        assert not uplink_exact
