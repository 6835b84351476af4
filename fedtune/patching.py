"""Replace one of Flower's attributes (a method, a module function) with a wrapper of it, once.

fedtune changes Flower's behaviour in place at process start (fedtune.object_waits, fedtune.whole_body); each
such change marks its wrapper, so applying it again (a test, a second entry point) leaves the first in place
instead of wrapping the wrapper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


def wrap_once(owner: Any, name: str, wrap: Wrap, marker: str) -> None:
    """`owner.name = wrap(owner.name)` unless `owner.name` already carries `marker`."""
    original = getattr(owner, name)
    if not getattr(original, marker, False):
        wrapped = wrap(original)
        setattr(wrapped, marker, True)
        setattr(owner, name, wrapped)
