"""Issue 13 items 7 and 12: nothing in a data file decides what code `fedtune eval` runs or which base model
it loads; an adapter that does not fit the base model is an error; `model.revision` reaches every load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.eval.sample import EMBEDDED_MMLU

# A model folder whose config names custom code: transformers imports it only with trust_remote_code.
EVIL_CODE = """\
import os
from pathlib import Path

Path(os.environ["FEDTUNE_TEST_MARKER"]).write_text("remote code ran")


class EvilForCausalLM:
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise RuntimeError("remote code ran")
"""


@pytest.fixture()
def evil_model(smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    folder = tmp_path / "evil-model"
    folder.mkdir()
    for item in smollm2_dir.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((smollm2_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL_CODE)
    marker = tmp_path / "marker"
    monkeypatch.setenv("FEDTUNE_TEST_MARKER", str(marker))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    return folder, marker


def _quick(adapter: Path, out: Path, *extra: str) -> list[str]:
    """The cheapest full run: letter logits, unquantised, one question a subject, the adapter only."""
    return [
        "eval", "--protocol", "lm-eval", "--adapter", str(adapter), "--mmlu", EMBEDDED_MMLU, "--limit", "1",
        "--quantization", "0", "--dtype", "float32", "--no-base", "--no-progress", "--out", str(out), *extra,
    ]  # fmt: skip


def test_results_json_next_to_the_adapter_cannot_enable_remote_code(
    evil_model: tuple[Path, Path], adapter_dir: Path, tmp_path: Path
):
    folder, marker = evil_model
    # the attacker's run folder: results.json says trust_remote_code and names the evil model
    run = tmp_path / "run"
    shutil.copytree(adapter_dir, run / "adapter")
    (run / "results.json").write_text(
        json.dumps({"budget_mb": 1.5, "config": {"model": {"trust_remote_code": True, "name": str(folder)}}})
    )
    assert main(_quick(run / "adapter", tmp_path / "out", "--base-model", str(folder))) == 0
    assert not marker.exists(), "remote code ran although no --trust-remote-code was given"
    payload = json.loads((tmp_path / "out" / "mmlu_results.json").read_text())
    assert payload["trust_remote_code"] is False and payload["budget_mb"] == 1.5

    # the control: the same run with the flag does import the folder's code (so the check above can fail)
    with pytest.raises((RuntimeError, AttributeError, SystemExit)):  # the fake class is no model
        main(_quick(run / "adapter", tmp_path / "out2", "--base-model", str(folder), "--trust-remote-code"))
    assert marker.read_text() == "remote code ran"


def test_base_model_only_from_a_flag(adapter_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_info:
        main(_quick(adapter_dir, tmp_path / "out"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--base-from-adapter" in err and "embedded/smollm2-135m-instruct" in err
    # with the explicit consent, the adapter's own base is used
    assert main(_quick(adapter_dir, tmp_path / "out", "--base-from-adapter")) == 0
    payload = json.loads((tmp_path / "out" / "mmlu_results.json").read_text())
    assert payload["base_model"] == "embedded/smollm2-135m-instruct"


# ---- an adapter that does not fit is an error ---------------------------------------------------


@pytest.fixture(scope="module")
def loaded_base(smollm2_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)


@pytest.fixture()
def fp32_base(loaded_base):
    """A fresh copy per test: peft injects its layers into the model it is given."""
    import copy

    return copy.deepcopy(loaded_base)


def _edited_adapter(adapter_dir: Path, target: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter_dir, target)
    state = load_file(str(target / "adapter_model.safetensors"))
    save_file(edit(dict(state)), str(target / "adapter_model.safetensors"))
    return target


def _extra_layer(state: dict) -> dict:
    key = next(k for k in state if ".layers.0." in k)
    state[key.replace(".layers.0.", ".layers.99.")] = state[key].clone()
    return state


def _missing_tensor(state: dict) -> dict:
    state.pop(sorted(state)[0])
    return state


def _renamed_module(state: dict) -> dict:
    return {k.replace("q_proj", "query_key_value"): v for k, v in state.items()}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_extra_layer, "do not match the base model"),
        (_missing_tensor, "do not match the base model"),
        (_renamed_module, "do not match the base model"),
    ],
)
def test_adapter_keys_must_match_the_base_model(
    fp32_base, adapter_dir: Path, tmp_path: Path, edit, message: str
):
    from fedtune.errors import FedTuneError
    from fedtune.eval.loading import attach_adapter

    bad = _edited_adapter(adapter_dir, tmp_path / "bad", edit)
    with pytest.raises(FedTuneError, match=message):
        attach_adapter(fp32_base, bad)


def test_the_matching_adapter_attaches(fp32_base, adapter_dir: Path):
    from peft import PeftModel

    from fedtune.eval.loading import attach_adapter

    assert isinstance(attach_adapter(fp32_base, adapter_dir), PeftModel)


def test_adapter_of_another_shape_is_an_error(fp32_base, adapter_dir: Path, tmp_path: Path):
    from fedtune.errors import FedTuneError
    from fedtune.eval.loading import attach_adapter

    def narrower(state: dict) -> dict:
        key = next(k for k in state if "lora_A" in k)
        state[key] = state[key][:, :-1].contiguous()
        return state

    bad = _edited_adapter(adapter_dir, tmp_path / "narrow", narrower)
    with pytest.raises(FedTuneError, match=r"cannot load it onto the base model|has shape"):
        attach_adapter(fp32_base, bad)


# ---- model.revision reaches every from_pretrained ------------------------------------------------


def test_revision_reaches_every_load(smollm2_dir: Path, monkeypatch: pytest.MonkeyPatch):
    import transformers

    from fedtune.config import parse_run_config
    from fedtune.eval.loading import load_model
    from fedtune.model import initial_adapter_state, load_base_model, load_tokenizer

    seen: list[tuple[str, object, object]] = []
    depth = [0]  # only fedtune's own calls, not the ones transformers makes inside them
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.AutoConfig):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, _name=cls.__name__, **kwargs):
            if depth[0] == 0:
                seen.append((_name, kwargs.get("revision", "<absent>"), kwargs.get("trust_remote_code")))
            depth[0] += 1
            try:
                return _original(klass, *args, **kwargs)  # a local folder accepts (and ignores) a revision
            finally:
                depth[0] -= 1

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))

    cfg = parse_run_config(
        {"model.name": str(smollm2_dir), "model.revision": "0123abcd", "model.trust-remote-code": False,
         "model.quantization": 0}
    )  # fmt: skip
    load_tokenizer(cfg.model)
    load_base_model(cfg.model, "cpu")
    initial_adapter_state(cfg.model, seed=1)
    load_model(str(smollm2_dir), 0, "float32", False, revision="0123abcd", protocol="lm-eval")
    load_model(str(smollm2_dir), 4, "auto", False, revision="0123abcd", protocol="flowertune")
    names = {name for name, _, _ in seen}
    assert names == {"AutoTokenizer", "AutoModelForCausalLM", "AutoConfig"}
    assert all(revision == "0123abcd" for _, revision, _ in seen), seen
    assert all(trust is False for _, _, trust in seen), seen
