"""Streaming JSONL transcript files: counted, parsed line by line and batched, never read whole."""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from ..errors import InvalidOption
from ..limits import MAX_JSON_DEPTH, MAX_LINE_BYTES, MAX_TRANSCRIPTS
from ..models import Session
from ..records import record_to_session

IMPORT_BATCH_SESSIONS = 500  # sessions inserted per transaction by an import


IMPORT_BATCH_CHARS = 8_000_000  # ... or fewer, when their messages hold this many characters


def _check_count(n: int, source: str, *, more: bool = False) -> None:
    if n > MAX_TRANSCRIPTS:
        count = f"more than {MAX_TRANSCRIPTS}" if more else str(n)
        raise InvalidOption(f"{source}: {count} transcripts; one import takes at most {MAX_TRANSCRIPTS} "
                            "(MAX_TRANSCRIPTS): split them into several files. Nothing was stored")
    if n == 0:
        raise InvalidOption(f"{source}: no sessions found (expected one JSON object or message list per line)")


def _read_lines(f: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines of a binary file with their 1-based numbers; a line over MAX_LINE_BYTES is refused
    after reading at most that much of it."""
    n = 0
    while raw := f.readline(MAX_LINE_BYTES + 2):
        n += 1
        line = raw.rstrip(b"\r\n")
        if len(line) > MAX_LINE_BYTES:
            raise InvalidOption(f"line {n} is longer than {MAX_LINE_BYTES} bytes (MAX_LINE_BYTES)")
        if n == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8):]
        if line.strip():
            yield n, line


def _count_file(path: Path, source: str) -> int:
    """Transcripts (non-blank lines) in a JSONL file, read in constant memory; stops past MAX_TRANSCRIPTS."""
    count = 0
    try:
        with path.open("rb") as f:
            for _ in _read_lines(f):
                count += 1
                if count > MAX_TRANSCRIPTS:
                    _check_count(count, source, more=True)
    except OSError as e:
        raise InvalidOption(f"cannot read {source}: {e.strerror or e}") from None
    _check_count(count, source)
    return count


def _parse_file(path: Path, source: str) -> Iterator[Session]:
    try:
        with path.open("rb") as f:
            for n, line in _read_lines(f):
                yield _parse_line(line, n)
    except OSError as e:
        raise InvalidOption(f"cannot read {source}: {e.strerror or e}") from None


def _parse_line(line: str | bytes, line_no: int) -> Session:
    if isinstance(line, bytes):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidOption(f"line {line_no} is not valid UTF-8 (byte {e.start + 1})") from None
    else:
        text = line
        if len(text) > MAX_LINE_BYTES // 4 and len(text.encode("utf-8", "surrogatepass")) > MAX_LINE_BYTES:
            raise InvalidOption(f"line {line_no} is longer than {MAX_LINE_BYTES} bytes (MAX_LINE_BYTES)")
    return record_to_session(_json_line(text, line_no), line_no)


def _take_batch(sessions: Iterator[Session]) -> list[Session]:
    """The next IMPORT_BATCH_SESSIONS sessions, or fewer holding IMPORT_BATCH_CHARS characters."""
    batch: list[Session] = []
    chars = 0
    for s in sessions:
        batch.append(s)
        chars += sum(len(m.content or "") + 100 for m in s.messages)
        if len(batch) >= IMPORT_BATCH_SESSIONS or chars >= IMPORT_BATCH_CHARS:
            break
    return batch


def _json_line(line: str, line_no: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidOption(f"line {line_no} is not valid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise InvalidOption(f"line {line_no}: nested more than {MAX_JSON_DEPTH} levels deep (limit MAX_JSON_DEPTH)") \
            from None


def _numbered(lines: Iterable[str | bytes]) -> Iterable[tuple[int, str | bytes]]:
    for n, line in enumerate(lines, 1):
        if line.strip():
            yield n, line
