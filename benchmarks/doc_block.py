"""Writes a benchmark's table between two marker comments of a markdown file."""
from __future__ import annotations

import re
import sys
from pathlib import Path


def fill(doc: Path, name: str, text: str) -> None:
    """Replaces what stands between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in doc with text."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    content = doc.read_text(encoding="utf-8")
    if begin not in content or end not in content:
        sys.exit(f"{doc} has no {begin} ... {end} block to fill")
    doc.write_text(re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: f"{begin}\n{text}\n{end}", content,
                          flags=re.S), encoding="utf-8")
