"""fedtune.runtime_env's transfer settings reach Flower: every flwr process fedtune starts cuts arrays into
5 MiB objects (Flower's size) unless told otherwise, a bad value is one clear line, and Flower itself reads the value."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedtune.errors import FedTuneError
from fedtune.runtime_env import CHUNK_ENV, DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, chunk_bytes, flwr_env


def test_default_and_override():
    assert flwr_env({})[CHUNK_ENV] == str(DEFAULT_CHUNK_BYTES) == str(5 * 2**20)
    assert flwr_env({CHUNK_ENV: "16777216"})[CHUNK_ENV] == "16777216"  # the operator's value wins
    assert flwr_env({}, **{CHUNK_ENV: "1048576"})[CHUNK_ENV] == "1048576"


@pytest.mark.parametrize("bad", ["16MiB", "-1", "0", "1000", str(MAX_CHUNK_BYTES + 1), "1e6"])
def test_bad_values_are_one_line(bad):
    with pytest.raises(FedTuneError, match=f"{CHUNK_ENV} must be a number of bytes") as err:
        flwr_env({CHUNK_ENV: bad})
    assert "\n" not in str(err.value)
    with pytest.raises(FedTuneError):
        chunk_bytes({CHUNK_ENV: bad})


def count_chunks(env: dict[str, str], nbytes: int) -> int:
    """How many objects Flower cuts one array of `nbytes` into, in a fresh process with `env`."""
    code = (
        "import numpy as np; from flwr.app import Array; "
        f"print(len(Array(np.zeros({nbytes}, dtype=np.uint8)).slice_array()))"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def test_flower_cuts_arrays_as_the_environment_says():
    nbytes = 40 * 2**20  # half a reference adapter message
    base = {name: value for name, value in os.environ.items() if name != CHUNK_ENV}
    assert count_chunks(flwr_env(base), nbytes) == 9  # Flower's 5 MiB: 8 of them and the .npy header's bytes
    assert count_chunks(flwr_env({**base, CHUNK_ENV: str(16 * 2**20)}), nbytes) == 3  # 16 + 16 + 8 MiB
