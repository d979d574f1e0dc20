"""The texts a harvest reads and the token windows it cuts them into.

Documents come from the demo corpus (:func:`demo_texts`), text files, a folder of them, or the
records of a ``.jsonl`` / ``.parquet`` file (:func:`read_texts`), in a seeded order (:func:`shuffled`);
:class:`Windows` tokenizes them into the windows a forward pass sees, packed or one document each.
Nothing here loads a model: :mod:`sae_registry.harvest` runs it.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ..errors import SAERegistryError
from .models import sink_token_id

__all__ = ["Windows", "demo_texts", "read_texts", "shuffled"]


def _passages(text: str, target_chars: int) -> list[str]:
    """Split text on blank lines and join neighbouring paragraphs into ~target_chars passages."""
    passages, current = [], ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        current = f"{current}\n\n{para}" if current else para
        if len(current) >= target_chars:
            passages.append(current)
            current = ""
    if current:
        passages.append(current)
    return passages


def demo_texts(target_chars: int = 600) -> list[str]:
    """The demo corpus: the Python Language Reference topics that every CPython ships.

    ``pydoc_data.topics`` (what ``help("if")`` prints) is ~465,000 characters of English prose
    and examples, present on any machine with Python, with no download.
    """
    from pydoc_data.topics import topics

    return [p for name in sorted(topics) for p in _passages(topics[name], target_chars)]


def _documents(text: str, separator: str) -> list[str]:
    """``text`` cut at every line that the regular expression ``separator`` matches (that line dropped)."""
    pattern = re.compile(separator)
    documents: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if pattern.search(line):
            documents.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    documents.append("\n".join(current).strip())
    return [d for d in documents if d]


def read_texts(path: str | Path, target_chars: int = 600, separator: str | None = None, *,
               field: str = "text") -> Iterable[str]:
    """Documents from a text file, or from every ``*.txt``/``*.md`` file under a directory (sorted by
    path; a list), or the ``field`` of every record of a ``.jsonl`` / ``.parquet`` file (a local copy of a
    Hugging Face dataset), read as a stream: an iterator whose first record is checked now.

    Without ``separator``, each text file is cut at blank lines and neighbouring paragraphs are joined
    until a passage reaches ``target_chars`` characters (a passage never spans two files). With
    ``separator``, a regular expression, each file is cut at the lines it matches (``'^%$'`` for a
    fortune file); those lines are dropped and every piece is one document, however short or long.
    A document longer than a window is cut into several windows by :func:`harvest`.
    """
    path = Path(path)
    if path.is_file() and path.suffix in (".jsonl", ".parquet"):
        return _records(path, field)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
    elif path.is_file():
        files = [path]
    else:
        raise SAERegistryError(f"no text at {path}: pass a text file, a directory of .txt files, or a .jsonl / "
                               ".parquet file with a `text` field")
    if separator is not None:
        try:
            re.compile(separator)
        except re.error as e:
            raise SAERegistryError(f"--separator must be a regular expression: {e}") from None
    cut = (lambda text: _documents(text, separator)) if separator is not None else (
        lambda text: _passages(text, target_chars))
    texts = [p for f in files for p in cut(f.read_text(errors="replace"))]
    if not texts:
        raise SAERegistryError(f"{path} holds no text")
    return texts


def _records(path: Path, field: str) -> Iterator[str]:
    """The ``field`` of each record of a .jsonl or .parquet file, streamed; a missing field is an error now."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        reader = pq.ParquetFile(path)
        if field not in reader.schema_arrow.names:
            raise SAERegistryError(f"{path} has no `{field}` column (it has {', '.join(reader.schema_arrow.names)}): "
                                   "harvest reads the text of each row from `text`")
        rows = (t for batch in reader.iter_batches(columns=[field], batch_size=1024)
                for t in batch.column(0).to_pylist())
    else:
        def parsed():
            with path.open() as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield n, json.loads(line)
                        except ValueError:
                            raise SAERegistryError(f"{path} line {n} is not JSON: a .jsonl holds one JSON "
                                                   "object per line") from None

        def texts(records):
            for n, record in records:
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise SAERegistryError(f"{path} line {n} has no `{field}` field (a string): harvest reads "
                                           f"the text of each record from `{field}`")
                yield record[field]

        rows = texts(parsed())
    first = next(iter(rows), None)  # checked before any work starts
    if first is None:
        raise SAERegistryError(f"{path} holds no text")
    return itertools.chain([first], rows)


class Windows:
    """Token windows of ``max_length``, ``batch_size`` at a time, from documents in their harvest order.

    Unpacked: each document is cut into windows on its own (the tokenizer's special tokens added, the
    last window padded). Packed: documents are joined by the sink token into one stream that fills
    every window, each window beginning with the sink (a causal LM's BOS: the attention sink, whose
    norm is many times the rest's); with ``exclude_special`` the sink positions are not kept.
    """

    def __init__(self, tokenizer, *, max_length: int, batch_size: int, pack: bool, exclude_special: bool) -> None:
        self.tokenizer, self.max_length, self.batch_size = tokenizer, max_length, batch_size
        self.pack, self.exclude_special = pack, exclude_special
        self.sink = sink_token_id(tokenizer) if pack else None
        if pack and max_length < 2:
            raise SAERegistryError("max_length must be at least 2 to pack windows (the sink token plus text)")

    def batches(self, docs: Iterable[str]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(input_ids, attention_mask, keep)`` per batch of windows."""
        if not self.pack:
            for group in _grouped(docs, self.batch_size):
                enc = self.tokenizer(group, truncation=True, max_length=self.max_length,
                                     return_overflowing_tokens=True, return_special_tokens_mask=True,
                                     padding=True, return_tensors="pt")
                keep = enc["attention_mask"].bool()
                if self.exclude_special:
                    keep &= ~enc["special_tokens_mask"].bool()
                yield enc["input_ids"], enc["attention_mask"], keep
            return
        sink = self.sink
        assert sink is not None  # packing: a sink token starts every window (set in __init__ when pack)
        width, windows = self.max_length - 1, []
        stream: list[int] = []
        for group in _grouped(docs, 64):
            # split_special_tokens: text that spells a special token is text, so that the only
            # special tokens in a packed window are the sinks (downstream rebuilds windows on that)
            for ids in self.tokenizer(group, add_special_tokens=False, split_special_tokens=True)["input_ids"]:
                stream.extend([sink, *ids] if stream else ids)
                while len(stream) >= width:
                    windows.append([sink, *stream[:width]])
                    stream = stream[width:]
                    if len(windows) == self.batch_size:
                        yield self._packed(windows, sink)
                        windows = []
        if stream:
            windows.append([sink, *stream])
        if windows:
            yield self._packed(windows, sink)

    def _packed(self, windows: list[list[int]], sink: int):
        length = max(len(w) for w in windows)
        ids = torch.full((len(windows), length), sink, dtype=torch.long)
        mask = torch.zeros((len(windows), length), dtype=torch.long)
        for i, w in enumerate(windows):
            ids[i, :len(w)], mask[i, :len(w)] = torch.tensor(w), 1
        keep = mask.bool() & ((ids != sink) if self.exclude_special else True)
        return ids, mask, keep


def _grouped(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while group := list(itertools.islice(it, n)):
        yield group


def shuffled(texts: Iterable[str], seed: int, buffer: int = 4096) -> Iterator[str]:
    """Documents in a seeded random order: all at once for a list, within buffers for a stream."""
    rng = random.Random(seed)
    for group in _grouped(texts, len(texts) if isinstance(texts, (list, tuple)) and texts else buffer):
        order = list(range(len(group)))
        rng.shuffle(order)
        yield from (group[i] for i in order)
