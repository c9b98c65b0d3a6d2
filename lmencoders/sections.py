"""Other generated reports as sections of ``RESULTS.md``.

A benchmark that writes its own Markdown report (the LM Decision Transformer comparison, for
one) stays the only source of its tables; ``lmencoders report --sections FILE`` copies that
file into ``RESULTS.md`` between markers, headings one level down and relative links rebased,
so a later report (or ``--sections-only``) replaces the block instead of adding a second.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

__all__ = ["as_section", "place_sections"]

# the heading (written by report.py) that a section goes before when RESULTS.md has no
# block for it yet
ANCHOR = "## The paper's numbers, for comparison"
_LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def _begin(name: str) -> str:
    return f"<!-- begin section: {name} (generated: edit its source, then lmencoders report) -->"


def _end(name: str) -> str:
    return f"<!-- end section: {name} -->"


def _rebased(link: str, source_dir: Path, target_dir: Path) -> str:
    if re.match(r"^([a-z][a-z0-9+.-]*:|/|#)", link):  # URLs, absolute paths, anchors
        return link
    return Path(os.path.relpath(source_dir / link, target_dir)).as_posix()


def as_section(source: str | Path, target: str | Path) -> str:
    """``source`` (a Markdown report) as a block of ``target``: each heading one level deeper,
    links and images relative to ``target``'s folder, code blocks untouched."""
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise FileNotFoundError(
            f"section {source}: no such report (run the command that writes it first)"
        )
    name = source.as_posix()
    source_dir, target_dir = source.resolve().parent, target.resolve().parent
    lines, in_code = [], False
    for line in source.read_text().strip().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code:
            if line.startswith("#"):
                line = "#" + line
            line = _LINK.sub(lambda m: m[1] + _rebased(m[2], source_dir, target_dir) + m[3], line)
        lines.append(line)
    return "\n".join([_begin(name), *lines, _end(name)])


def place_sections(text: str, sections: Sequence[str | Path], target: str | Path) -> str:
    """``text`` (a RESULTS.md) with each report in ``sections`` in its block: an existing
    block is replaced where it stands, a new one goes before the paper's numbers (or at the
    end)."""
    for source in sections:
        name = Path(source).as_posix()
        block = as_section(source, target)
        begin, end = text.find(_begin(name)), text.find(_end(name))
        if begin >= 0 and end > begin:
            text = text[:begin] + block + text[end + len(_end(name)) :]
        elif ANCHOR in text:
            at = text.index(ANCHOR)
            text = text[:at] + block + "\n\n" + text[at:]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    return text
