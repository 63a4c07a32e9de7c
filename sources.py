"""
The sources data.py reads, as a user downloads them: which files a --source names, and their
records, streamed (memory does not grow with a file's size).

    src = parse_source("fineweb-edu/sample/10BT/*.parquet:filter=int_score>=4:budget=18B")
    for path in source_files(src):           # sorted
        for rec in read_records(path, src):  # a str (a .txt block), or a dict (a record)
            doc = document(rec, src)         # None if the filter drops it; a str, or a chat

A source is PATH[:field=NAME][:budget=N][:filter=EXPR]; PATH is a file, a directory (every supported
file under it, hidden ones skipped) or a glob (quote it for the shell: "data/*/*.parquet"):
  .txt               documents are blocks separated by blank lines (read a block at a time)
  .jsonl, .jsonl.gz  one record per line
  .json              one JSON array of records (OpenHermes-2.5), read incrementally, or one record
                     per line
  .parquet           records read with pyarrow, only the columns needed
The document is record[field] (default "text", else "messages", else "conversations"). A field
holding a list of messages ({role, content} or ShareGPT's {from, value}) is a chat. filter: keep
records where a numeric field passes a comparison, e.g. int_score>=4 (FineWeb-Edu in the paper).
"""
import glob
import gzip
import json
import operator
import os
import re
import zlib

SOURCE_TYPES = (".txt", ".json", ".jsonl", ".jsonl.gz", ".parquet")
TYPE_NAMES = ".txt, .json, .jsonl, .jsonl.gz or .parquet"
TEXT_FIELDS = ("text", "messages", "conversations")  # the field read when a source names none
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq,
       "!=": operator.ne}


def parse_source(spec):
    """'PATH[:field=F][:budget=N][:filter=EXPR]' -> dict(path, field, budget, filter)."""
    path, *opts = spec.split(":")
    src = {"path": path}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or key not in ("field", "budget", "filter"):
            raise ValueError(f"source {spec!r}: unknown option {opt!r} "
                             "(use field=, budget=, filter=)")
        if key == "budget":
            m = re.fullmatch(r"(\d+\.?\d*|\.\d+)([KMB]?)", value.upper())
            scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}
            value = int(float(m.group(1)) * scale[m.group(2)]) if m else 0
            if value < 1:
                raise ValueError(f"source {spec!r}: budget must be a token count of at least 1, "
                                 "like 500000, 1.5M or 2B")
        if key == "filter":
            _filter_parts(value)  # a malformed filter is refused now, not after hours of work
        src[key] = value
    return src


def _filter_parts(expr):
    m = re.fullmatch(r"\s*(\w+)\s*(>=|<=|==|!=|>|<)\s*(-?[\d.eE+-]+)\s*", expr)
    if not m:
        raise ValueError(f"filter {expr!r}: expected FIELD OP NUMBER, e.g. int_score>=4")
    return m.group(1), OPS[m.group(2)], float(m.group(3))


def source_files(src):
    """The files a source names, sorted; refuses a missing path, an empty glob or directory, and a
    file of another type."""
    path = src["path"]
    if glob.has_magic(path):
        matches = glob.glob(path, recursive=True)
        if not matches:
            raise FileNotFoundError(f"source {path!r} matches no files: check the pattern "
                                    "(and quote it, so that the shell does not expand it)")
        files = [f for m in matches for f in (_files_under(m) if os.path.isdir(m) else [m])]
    elif os.path.isdir(path):
        files = _files_under(path)
    elif os.path.isfile(path):
        if not path.endswith(SOURCE_TYPES):
            raise ValueError(f"source {path!r}: unknown file type (use {TYPE_NAMES})")
        return [path]
    else:
        raise FileNotFoundError(f"source {path!r} does not exist")
    files = sorted(f for f in files if f.endswith(SOURCE_TYPES))
    if not files:
        raise ValueError(f"source {path!r} holds no {TYPE_NAMES} files")
    if src.get("filter") and any(f.endswith(".txt") for f in files):
        raise ValueError(f"source {path!r}: filter= needs records with fields (.json, .jsonl, "
                         ".parquet); a .txt file has none")
    return files


def _files_under(root):
    # hidden files and dirs are a download's bookkeeping (.cache/huggingface/, .gitattributes)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
    return out


def read_records(path, src=None):
    """A file's records in order: a str per .txt block, a dict per JSON or parquet record."""
    try:
        if path.endswith(".txt"):
            yield from _txt_blocks(path, BLOCK)
        elif path.endswith(".parquet"):
            yield from _parquet_records(path, src or {})
        else:
            with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
                array = path.endswith(".json") and _peek(f) == "["
                yield from _json_array(f, path, BLOCK) if array else _json_lines(f, path)
    except (UnicodeDecodeError, EOFError, OSError, zlib.error, *_arrow_errors()) as e:
        # their messages name no file
        raise ValueError(f"source {path!r} cannot be read ({e}): is it "
                         f"{os.path.splitext(path)[1]}, in UTF-8, and complete?") from None


def document(rec, src):
    """The document of a record: None when the filter drops it, else a str or a list of chat
    messages."""
    if isinstance(rec, str):  # a .txt block
        return rec
    if src.get("filter"):
        key, op, value = _filter_parts(src["filter"])
        if key not in rec:
            raise KeyError(f"filter {src['filter']!r}: record has no field {key!r} "
                           f"(fields: {sorted(rec)})")
        if not op(float(rec[key]), value):
            return None
    name = src.get("field") or next((k for k in TEXT_FIELDS if k in rec), None)
    if name not in rec:
        raise KeyError(f"source {src['path']!r}: record has no field {name or 'text'!r} "
                       f"(fields: {sorted(rec)}); pick one with :field=NAME")
    doc = rec[name]
    return _chat_messages(doc) if isinstance(doc, list) else doc


def _chat_messages(turns):
    # ShareGPT-style turns (OpenHermes-2.5) name roles differently
    roles = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
             "assistant": "assistant"}
    return [{"role": t["role"], "content": t["content"]} if "role" in t else
            {"role": roles[t["from"]], "content": t["value"]} for t in turns]


# -----------------------------------------------------------------------------
# the file formats, each read a block (or a record) at a time

BLOCK = 1 << 20  # characters read at a time
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def _txt_blocks(path, block):
    """The blocks between blank lines, as splitting the whole text at blank lines would give."""
    with open(path, encoding="utf-8") as f:
        text, scan = "", 0  # text: not yet yielded; no blank line starts before text[scan]
        while chunk := f.read(block):
            text += chunk
            start = 0
            for m in _BLANK_LINE.finditer(text, scan):
                yield from _nonblank(text[start:m.start()])
                start = m.end()
            text = text[start:]
            # a blank line that the next chunk completes starts at the last newline, if the text
            # after it is all spaces and tabs; scanning from there keeps a long document linear
            last = text.rfind("\n")
            scan = last if last >= 0 else len(text)
        yield from _nonblank(text)


def _nonblank(block):
    if block.strip():
        yield block.strip("\n")


def _json_lines(f, path):
    for n, line in enumerate(f, 1):
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n} is not a JSON record ({e}): fix or drop that "
                                 "line") from None


def _peek(f):
    """The file's first non-blank character; the file is left at its start."""
    while (c := f.read(1)) and c.isspace():
        pass
    f.seek(0)
    return c


LARGEST_RECORD = 1 << 26  # characters: a longer "record" is a broken file, not a document


def _json_array(f, path, block):
    """The records of a JSON array, decoded one at a time from a rolling buffer of the text: memory
    holds a block and the record being decoded, never the whole array."""
    decoder, ws = json.JSONDecoder(), re.compile(r"\s*")
    buf, pos, eof, n = "", 0, False, 0

    def fill():  # drop what was read, add text; a record longer than a block doubles the window
        nonlocal buf, pos, eof
        chunk = f.read(max(block, len(buf) - pos))
        buf, pos, eof = buf[pos:] + chunk, 0, not chunk

    def next_char():  # skip whitespace: the next character, "" at the end of the file
        nonlocal pos
        while True:
            pos = ws.match(buf, pos).end()
            if pos < len(buf) or eof:
                return buf[pos:pos + 1]
            fill()

    next_char()
    pos += 1  # the "[" that _peek saw
    if next_char() == "]":
        return
    while True:
        next_char()
        while True:
            try:  # a record cut by the end of the buffer fails to decode: read on and retry
                rec, pos = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as e:
                if eof or len(buf) - pos > LARGEST_RECORD:
                    raise ValueError(f"{path}: item {n + 1} of the JSON array is not valid JSON "
                                     f"({e.msg}): fix the file or download it again") from None
                fill()
        n += 1
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: item {n} of the JSON array is a {type(rec).__name__}, "
                             "not a record ({...})")
        yield rec
        c = next_char()
        pos += 1
        if c == "]":
            if next_char():
                raise ValueError(f"{path}: text follows the JSON array's closing ']'")
            return
        if c != ",":
            raise ValueError(f"{path}: after item {n} of the JSON array comes {c or 'the end'!r} "
                             "where ',' or ']' belongs: is the file complete?")


def _parquet_records(path, src):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    # only the columns used: FineWeb-Edu's url, dump, date ... are most of a shard's bytes
    field = src.get("field") or next((k for k in TEXT_FIELDS if k in names), None)
    columns = [c for c in (field, src.get("filter") and _filter_parts(src["filter"])[0])
               if c in names]
    for batch in pf.iter_batches(batch_size=1024, columns=columns or None):
        yield from batch.to_pylist()


def _arrow_errors():
    try:
        import pyarrow
    except ImportError:
        return ()
    return (pyarrow.ArrowException,)
