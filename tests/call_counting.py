"""Counting the calls of an engine function wherever an engine module holds it."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path


def count_calls(monkeypatch, counts: Counter, name: str, original, only_path: Path | None = None) -> None:
    """Wrap `original` wherever an engine module holds it (its own module and every `from ... import`), counting
    calls (those whose first argument is `only_path`, when given)."""

    def counting(*args, **kwargs):
        if only_path is None or Path(args[0]).resolve() == only_path.resolve():
            counts[name] += 1
        return original(*args, **kwargs)

    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("engine") and module is not None:
            for attribute, value in list(vars(module).items()):
                if value is original:
                    monkeypatch.setattr(module, attribute, counting)
