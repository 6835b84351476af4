import math
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, get_project_config

from fedtune.config import FedTuneConfig, parse_run_config
from fedtune.errors import FedTuneError

REPO = Path(__file__).resolve().parents[2]


def project_run_config() -> dict:
    return flatten_dict(get_project_config(REPO)["tool"]["flwr"]["app"]["config"])


def test_pyproject_defaults_are_the_reference_configuration():
    cfg = FedTuneConfig.from_run_config(project_run_config())
    assert cfg.num_server_rounds == 10
    assert cfg.strategy.fraction_train == 0.1
    assert cfg.model.name == "internlm/internlm3-8b-instruct"
    assert cfg.model.trust_remote_code is True
    assert cfg.model.quantization == 4
    assert (cfg.model.lora.r, cfg.model.lora.alpha) == (16, 32)
    assert cfg.model.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert cfg.train.optim == "paged_adamw_8bit"
    assert (cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps) == (1, 4)
    assert cfg.train.max_steps == 10 and cfg.train.seq_length == 512
    assert cfg.train.save_every_round == 5
    assert cfg.dataset.name == "flwrlabs/alpaca-gpt4" and cfg.dataset.num_partitions == 20
    assert cfg.model.transport_dtype == "float32"


def test_every_pyproject_key_is_known_and_every_known_key_has_a_default():
    from fedtune.config import KEYS

    assert set(project_run_config()) == set(KEYS)


def test_learning_rate_is_cosine_across_rounds():
    cfg = FedTuneConfig.from_run_config(project_run_config())
    assert cfg.learning_rate(0) == pytest.approx(5e-5)
    assert cfg.learning_rate(10) == pytest.approx(1e-6)
    assert cfg.learning_rate(5) == pytest.approx((5e-5 + 1e-6) / 2)
    expected = 1e-6 + 0.5 * (5e-5 - 1e-6) * (1 + math.cos(math.pi * 3 / 10))
    assert cfg.learning_rate(3) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num-server-rounds", 0, "num-server-rounds=0: must be > 0"),
        ("num-server-rounds", "ten", "num-server-rounds='ten': expected an integer"),
        ("strategy.fraction-train", 1.5, "strategy.fraction-train=1.5: must be in (0, 1]"),
        ("strategy.fraction-train", 0, "strategy.fraction-train=0.0: must be in (0, 1] (0 trains no node)"),
        ("comm.transport", "zip", "comm.transport='zip': must be one of ('packed', 'per-tensor')"),
        ("strategy.max-num-examples", 0, "strategy.max-num-examples=0: must be > 0"),
        ("strategy.fraction-evaluate", 0.5, "strategy.fraction-evaluate=0.5: must be 0 (the fedtune ClientApp does no"),
        ("model.quantization", 3, "model.quantization=3: must be one of (0, 4, 8)"),
        ("model.lora.r", -4, "model.lora.r=-4: must be > 0"),
        ("model.lora.target-modules", " , ", "model.lora.target-modules"),
        ("model.transport-dtype", "float16", "model.transport-dtype='float16'"),
        ("model.trust-remote-code", "yes", "model.trust-remote-code='yes': expected true or false"),
        ("train.learning-rate-max", float("nan"), "train.learning-rate-max=nan: must be finite"),
        ("trian.max-steps", 3, "unknown run config key 'trian.max-steps'"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_key(key, value, message):
    config = project_run_config()
    config[key] = value
    with pytest.raises(FedTuneError) as info:
        parse_run_config(config)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_relations_are_checked():
    config = project_run_config()
    config["train.learning-rate-min"] = 1.0
    with pytest.raises(FedTuneError, match="learning-rate-min must not exceed"):
        parse_run_config(config)
