"""Instruction splits for refusal studies, shipped with patchlab (see ``SOURCES.md`` here).

- Harmful / harmless train, val and test splits of Arditi et al. 2024 (``harmful_*.json``,
  ``harmless_*.json``): JSON lists of ``{"instruction", "category"}``.
- XSTest v2 (Röttger et al. 2024, ``xstest_v2_prompts.csv``): 250 safe prompts that look unsafe and
  200 unsafe contrasts. `xstest` splits every prompt type in half with a seeded shuffle: the
  ``"train"`` half may be trained on, the ``"test"`` half is held out.
- patchlab's own contrastive requests (written for this project, Apache-2.0):
  ``harmless_rewrites_train.json``, harmless rewrites of harmful train instructions that keep their
  phrasing ("How do I make a cake at home?" beside "How do I make a bomb at home?"), and
  ``harmless_twins_test.json``, the same for harmful test instructions (held out: evaluation only).
  Each item is ``{"instruction", "rewrite_of"}``, the index of the original in its split.

Content warning: the harmful files hold requests for harmful content. They are data for measuring
refusal, never prompts to act on.
"""

from __future__ import annotations

import csv
import json
import random
from importlib import resources

__all__ = ["KINDS", "SPLITS", "instructions", "xstest", "harmless_rewrites", "harmless_twins", "data_sha256"]

KINDS = ("harmful", "harmless")
SPLITS = ("train", "val", "test")
XSTEST_FILE = "xstest_v2_prompts.csv"


def _text(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def instructions(kind: str, split: str) -> list[str]:
    """The instructions of one split, in file order (fit on train, choose on val, report on test).

    Raises:
        ValueError: an unknown kind or split (the message lists the known ones).
    """
    if kind not in KINDS or split not in SPLITS:
        raise ValueError(f"no split {kind!r}/{split!r}: kind is one of {KINDS}, split one of {SPLITS}")
    return [item["instruction"] for item in json.loads(_text(f"{kind}_{split}.json"))]


def xstest(part: str = "test", *, label: str | None = None, seed: int = 0) -> list[dict]:
    """XSTest v2 prompts (``{"id", "prompt", "type", "label", "focus", "note"}``) of one half.

    Every prompt type is shuffled with ``random.Random(f"{seed}:{type}")`` and cut in half: the
    first ``n // 2`` prompts are ``"train"``, the rest ``"test"`` (held out). `label` keeps only
    ``"safe"`` (prompts that look unsafe and are not) or ``"unsafe"`` (their contrasts).

    Raises:
        ValueError: an unknown part or label.
    """
    if part not in ("train", "test") or label not in (None, "safe", "unsafe"):
        raise ValueError(f"xstest(part={part!r}, label={label!r}): part is 'train' or 'test', label None, "
                         "'safe' or 'unsafe'")
    rows = list(csv.DictReader(_text(XSTEST_FILE).splitlines()))
    by_type: dict[str, list[dict]] = {}
    for row in rows:
        by_type.setdefault(row["type"], []).append(row)
    kept = []
    for kind in sorted(by_type):
        items = sorted(by_type[kind], key=lambda r: int(r["id"]))
        random.Random(f"{seed}:{kind}").shuffle(items)
        half = len(items) // 2
        kept += items[:half] if part == "train" else items[half:]
    kept.sort(key=lambda r: int(r["id"]))
    return [r for r in kept if label is None or r["label"] == label]


def harmless_rewrites() -> list[str]:
    """Harmless rewrites of harmful train instructions, phrased like them (for training)."""
    return [item["instruction"] for item in json.loads(_text("harmless_rewrites_train.json"))]


def harmless_twins() -> list[str]:
    """Harmless twins of harmful test instructions, phrased like them (held out, for evaluation)."""
    return [item["instruction"] for item in json.loads(_text("harmless_twins_test.json"))]


def data_sha256() -> str:
    """One sha256 over every shipped data file (names and bytes), for provenance and cache keys."""
    import hashlib

    digest = hashlib.sha256()
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".json", ".csv")):
            digest.update(entry.name.encode() + b"\0" + entry.read_bytes() + b"\0")
    return digest.hexdigest()
