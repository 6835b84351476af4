"""Compiled decoder layers (`train.compile-layers`) learn what the eager layers learn, on the same real tokens,
and a model kept warm across rounds does not compile again."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.conftest import tiny_run_config

# The reference's 4-bit base (fp4, float32 compute) and the fast profile's (nf4, bfloat16 compute:
# profiles/fast.toml, the configuration that compiles its layers).
BASES = {"fp4-float32": ("fp4", "float32"), "nf4-bfloat16": ("nf4", "bfloat16")}


@pytest.fixture(scope="module", params=list(BASES))
def setup(request, tiny_model_dir, demo_data_file):
    from fedtune.config import FedTuneConfig
    from fedtune.dataset import load_node_dataset
    from fedtune.model import adapter_state, load_tokenizer, load_trainable_model

    quant_type, compute_dtype = BASES[request.param]

    cfg = FedTuneConfig.from_run_config(
        tiny_run_config(
            tiny_model_dir,
            **{
                "train.max-steps": 3,
                "model.lora.dropout": 0.0,  # dropout masks differ between eager and compiled RNG streams
                "train.per-device-train-batch-size": 4,
                "train.gradient-accumulation-steps": 1,
                "train.padding-free": True,
                "model.quant-type": quant_type,
                "model.compute-dtype": compute_dtype,
            },
        )
    )
    tokenizer = load_tokenizer(cfg.model)
    model = load_trainable_model(cfg.model, "cpu")
    trainset, _ = load_node_dataset(cfg.dataset.name, {"data-path": str(demo_data_file)}, 1)
    return cfg, tokenizer, model, trainset.select(range(64)), adapter_state(model)


def train(setup, checkpoint_every: int = 2, prepared=None, **overrides):
    from clientapp.trainer import train_one_round
    from fedtune.model import adapter_state, load_adapter_state

    cfg, tokenizer, model, trainset, initial = setup
    load_adapter_state(model, initial)
    settings = replace(cfg.train, **overrides)
    outcome = train_one_round(
        model, tokenizer, trainset, settings, 3e-3, "cpu", True, checkpoint_every, prepared=prepared
    )
    return outcome, adapter_state(model)


def test_compiled_layers_match_eager_and_do_not_recompile(setup):
    import torch

    from clientapp.trainer import decoder_layers

    _cfg, _tokenizer, model, _trainset, _initial = setup
    eager, _ = train(setup)
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))

    prepared: dict = {}
    compiled, _ = train(setup, compile_layers=True, prepared=prepared)
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    assert all("forward" in layer.__dict__ for layer in layers)
    # rows are padded to a multiple of 64 for the compiled layers; the count stays the real tokens
    assert compiled.tokens == eager.tokens
    assert compiled.steps == eager.steps == 3
    for a, b in zip(eager.loss_history, compiled.loss_history, strict=True):
        assert b == pytest.approx(a, rel=2e-3)

    # a warm trainer's next round (cached dataset, other lengths) reuses the compiled graph
    with torch._dynamo.config.patch(error_on_recompile=True):
        again, _ = train(setup, compile_layers=True, prepared=prepared)
    assert again.loss_history == pytest.approx(compiled.loss_history, rel=1e-4)

    train(setup)  # and switching it off gives the eager layers back
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_give_the_eager_gradients(setup, checkpointing):
    """One forward/backward on a padding-free batch: loss and every LoRA gradient as in eager mode. (After a
    few Adam steps the adapters drift further apart than this: Adam's per-element normalisation turns tiny
    differences of near-zero gradients into full-size steps.)"""
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from clientapp.trainer import set_layer_compile
    from fedtune.model import load_adapter_state

    _cfg, tokenizer, model, trainset, initial = setup
    rows = [
        {
            "input_ids": tokenizer.apply_chat_template(
                r["prompt"] + r["completion"], tokenize=True, return_dict=True
            )["input_ids"][:128]
        }
        for r in trainset.select(range(4))
    ]
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)
    batch = {k: v for k, v in collate(rows).items() if k in ("input_ids", "labels", "position_ids")}
    load_adapter_state(model, initial)
    with torch.no_grad():  # B = 0 at initialisation would leave A without gradients
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()

    def loss_and_grads(compiled: bool):
        set_layer_compile(model, compiled)
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    try:
        eager_loss, eager = loss_and_grads(False)
        compiled_loss, compiled = loss_and_grads(True)
    finally:
        set_layer_compile(model, False)
        model.zero_grad()
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-4)
    assert len(compiled) == len(eager) > 0
    for name, grad in eager.items():
        assert grad.norm() > 0, name
        # trl trains the LoRA weights in bf16 on a k-bit base: agreement to bf16's ~3 significant digits
        tolerance = 1e-2 if grad.dtype == torch.bfloat16 else 1e-3
        assert (compiled[name] - grad).float().norm() / grad.float().norm() < tolerance, name


def test_compile_needs_decoder_layers():
    import torch

    from clientapp.trainer import set_layer_compile

    with pytest.raises(ValueError, match="no decoder layer"):
        set_layer_compile(torch.nn.Sequential(torch.nn.Linear(2, 2)), True)
