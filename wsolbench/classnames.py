"""The one class-name cleaner: a dataset's class name as the text a model reads.

Dataset names carry an index prefix and underscores ("001.Black_footed_Albatross") or comma-separated
synonyms ("goldfish, Carassius auratus"). The methods' official code cleans them alike but for case and
synonyms (CLIP-ES/TeD-Loc and WWbL keep the first synonym, WWbL lower-cases, GenPromp keeps every synonym
for its meta-token rule); those differences are the arguments here.
"""
from __future__ import annotations

import re

_INDEX_PREFIX = re.compile(r"^\s*\d+[._ ]")  # "001." (CUB folders), "001_" / "001 " (other dumps)


def class_text(name: str, *, synonyms: str = "first", lower: bool = False) -> str:
    """"001.Black_footed_Albatross" → "Black footed Albatross"; ``synonyms="first"`` keeps the text before the
    first comma, ``"all"`` keeps every synonym; ``lower`` lower-cases."""
    text = _INDEX_PREFIX.sub("", str(name).strip())
    if synonyms == "first":
        text = text.split(",")[0]
    elif synonyms != "all":
        raise ValueError(f"synonyms must be 'first' or 'all', not {synonyms!r}")
    text = text.replace("_", " ").strip()
    return text.lower() if lower else text
