"""Small text helpers shared by the engine and the CLI: clip for summaries, dedupe lists."""

from __future__ import annotations

from typing import Any, Iterable


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, at a word boundary when one is near, with '...'."""
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text[: limit - 3]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:") + "..."


def one_line(text: str | None, limit: int = 200) -> str:
    """`text` on one line (whitespace collapsed) and clipped: for summaries sized for a reader's context."""
    return clip(" ".join((text or "").split()), limit)


def unique(items: Iterable[Any]) -> list[Any]:
    """The items in order, each once."""
    out: list[Any] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out
