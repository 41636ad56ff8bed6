"""Three-way merge of one text field edited on two sides (what rebase does for text fields).

Each side's edit of ``base`` is found as regions of ``base`` replaced by new text: the common
prefix and suffix are trimmed (one region: how most edits look), and when the changed middles
are short, :class:`difflib.SequenceMatcher` splits them into finer regions, so two edits in one
save can each merge. The merge applies both sides' regions when no two of them overlap; a
region that overlaps one of the other side's, or an insertion at the very point where the other
side also changes text, is a conflict (``None``).

The result does not depend on which side is "ours": regions are applied in the order of their
place in ``base``, and two regions never share a start. Identical regions on both sides (the
same change made twice) count once.
"""

from __future__ import annotations

from difflib import SequenceMatcher
from itertools import pairwise

FINE_LIMIT = 2_000  # characters of a changed middle still split into finer regions

Region = tuple[int, int, str]  # base[start:end] is replaced by the text


def regions(base: str, edited: str) -> list[Region]:
    """The regions of ``base`` that ``edited`` replaces, in order, none overlapping."""
    if base == edited:
        return []
    limit = min(len(base), len(edited))
    prefix = 0
    while prefix < limit and base[prefix] == edited[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and base[-1 - suffix] == edited[-1 - suffix]:
        suffix += 1
    old = base[prefix : len(base) - suffix]
    new = edited[prefix : len(edited) - suffix]
    if not old or not new or len(old) > FINE_LIMIT or len(new) > FINE_LIMIT:
        return [(prefix, prefix + len(old), new)]
    matcher = SequenceMatcher(None, old, new, autojunk=False)
    return [
        (prefix + i1, prefix + i2, new[j1:j2])
        for tag, i1, i2, j1, j2 in matcher.get_opcodes()
        if tag != "equal"
    ]


def _clash(a: Region, b: Region) -> bool:
    """Whether two regions of different sides cannot both apply in a well-defined order."""
    (a1, a2, _), (b1, b2, _) = a, b
    if a1 == b1:
        return True  # same start: which text comes first is undefined
    return a1 < b2 and b1 < a2  # overlapping ranges (an insertion strictly inside a range too)


def merge_text(base: str, head: str, mine: str) -> str | None:
    """``base`` with the edits of both ``head`` and ``mine``, or ``None`` when they overlap."""
    # one side's regions never clash with each other (equal text lies between them), and in
    # start order a region overlapping a later one also overlaps the next: checking each
    # neighbouring pair finds every clash
    every = sorted({*regions(base, head), *regions(base, mine)})  # the same change once
    for before, after in pairwise(every):
        if _clash(before, after):
            return None
    pieces: list[str] = []
    at = 0
    for start, end, text in every:
        pieces.append(base[at:start])
        pieces.append(text)
        at = end
    pieces.append(base[at:])
    return "".join(pieces)
