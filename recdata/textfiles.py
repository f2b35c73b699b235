"""Reading delimited text files with errors that name the file, the line and the fix.

The fast path is pyarrow's multithreaded CSV reader. Only when it fails do we rescan the file line by
line to find the first bad line, so the error can say exactly where and what.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv

from configs.errors import RecloraError
from recdata import storage


class IngestError(RecloraError, ValueError):
    """Bad input. The message is one line naming the file, line/column and the fix."""


@dataclass(frozen=True)
class Column:
    name: str  # canonical name it becomes
    kind: str  # "int" | "float" | "str"


_ARROW = {"int": pa.int64(), "float": pa.float64(), "str": pa.string()}
_NAMES = {"int": "an integer", "float": "a number", "str": "text"}


def open_bytes(url: str) -> bytes:
    fs, path = storage.get_fs(url)
    with storage.storage_errors(url):
        if not fs.exists(path):
            raise IngestError(f"{url}: file not found")
        with fs.open(path, "rb") as f:
            return f.read()


def read_delimited(
    url: str,
    columns: Sequence[Column | None],
    delimiter: str,
    *,
    header: bool = False,
    encoding: str = "utf-8",
    what: str = "",
    data: bytes | None = None,
) -> pa.Table:
    """Read a headerless (or header-skipped) delimited file whose columns are given by position.

    `columns[i] = None` drops column i. Multi-character delimiters (MovieLens '::') are folded into a
    single byte first, since pyarrow's parser takes one byte.
    """
    raw = open_bytes(url) if data is None else data
    if not raw.strip():
        raise IngestError(f"{url}: file is empty{f' (expected {what})' if what else ''}")
    delim = delimiter
    if len(delimiter) > 1:
        raw = raw.replace(delimiter.encode(), b"\x1f")
        delim = "\x1f"
    if encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
        try:
            raw = raw.decode(encoding).encode("utf-8")
        except (UnicodeDecodeError, LookupError) as e:
            raise IngestError(f"{url}: cannot decode as {encoding}: {e}") from None
    names = [f"c{i}" for i in range(len(columns))]
    types = {f"c{i}": _ARROW[c.kind] for i, c in enumerate(columns) if c is not None}
    keep = [f"c{i}" for i, c in enumerate(columns) if c is not None]
    try:
        table = pacsv.read_csv(
            io.BytesIO(raw),
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1 if header else 0, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter=delim, quote_char=False if delim != "," else '"'),
            convert_options=pacsv.ConvertOptions(
                column_types=types, include_columns=keep, strings_can_be_null=False, quoted_strings_can_be_null=False
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as e:
        raise _locate(url, raw, columns, delim, header, delimiter, what, e) from None
    return table.rename_columns([c.name for c in columns if c is not None])


def _locate(url, raw: bytes, columns, delim: str, header: bool, shown_delim: str, what: str, err) -> IngestError:
    """Scan line by line for the first line that breaks the expected layout (error path only)."""
    expected = len(columns)
    lines = raw.split(b"\n")
    start = 1 if header else 0
    for idx in range(start, len(lines)):
        line = lines[idx].rstrip(b"\r")
        lineno = idx + 1
        if not line and idx == len(lines) - 1:
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            return IngestError(
                f"{url}:{lineno}: bytes are not valid UTF-8 at position {e.start}; pass the file's encoding "
                f"(e.g. --encoding latin-1)"
            )
        fields = text.split(delim) if delim != "," else next(iter(_csv_split(text)))
        if len(fields) != expected:
            hint = ""
            if len(fields) == 1 and expected > 1:
                hint = f"; wrong delimiter? expected {shown_delim!r}"
            elif len(fields) < expected:
                hint = "; truncated line?"
            return IngestError(
                f"{url}:{lineno}: expected {expected} {_delim_name(shown_delim)}-separated fields"
                f"{f' ({what})' if what else ''}, found {len(fields)}{hint}: {text[:80]!r}"
            )
        for i, (field, col) in enumerate(zip(fields, columns)):
            if col is None or col.kind == "str":
                continue
            ok = _parses(field, col.kind)
            if not ok:
                return IngestError(
                    f"{url}:{lineno}: column {i + 1} ({col.name}) must be {_NAMES[col.kind]}, got {field!r}"
                    + ("; ids must be integers (map string ids to integers first)" if col.name.endswith("_id") else "")
                )
    return IngestError(f"{url}: cannot parse ({type(err).__name__}: {str(err).splitlines()[0][:200]})")


def _csv_split(text: str) -> Iterator[list[str]]:
    import csv

    return csv.reader([text])


def _parses(field: str, kind: str) -> bool:
    try:
        if kind == "int":
            int(field.strip())
        else:
            float(field.strip())
        return True
    except ValueError:
        return False


def _delim_name(d: str) -> str:
    return {"\t": "tab", ",": "comma", "|": "pipe", "::": "'::'"}.get(d, repr(d))
