"""The windows downstream fidelity runs the model on, and which of their positions a dictionary replaces.

Either a store's own held-out windows, rebuilt from its token provenance (:func:`windows_from_store`),
or any texts cut into windows the way harvest cuts them (:func:`windows_from_texts`). Only the
positions the store harvested are spliced: special tokens and a causal LM's sink keep their clean
activations, and padding is never touched.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import SAERegistryError
from ..store.reader import ActivationStore

__all__ = ["Window", "windows_from_store", "windows_from_texts"]


@dataclass
class Window:
    """One model input: token ids, and which positions the dictionary replaces."""

    input_ids: list[int]
    splice: list[bool]
    rows: list[int] | None = None  # the store rows of the spliced positions, when rebuilt from a store


def windows_from_texts(tokenizer, texts: Iterable[str], *, max_length: int, exclude_special: bool,
                       max_tokens: int, sink: int | None = None) -> list[Window]:
    """``texts`` cut into windows as harvest cuts them, until ``max_tokens`` positions to splice.

    With ``sink`` (a store harvested with packing, or a causal LM), each window is that token (the
    BOS / attention sink, never spliced) and up to ``max_length - 1`` tokens of one text.
    """
    texts = list(texts)
    out, n = [], 0
    for start in range(0, len(texts), 32):  # tokenise only as much as the budget needs
        if sink is not None:
            enc = tokenizer(texts[start:start + 32], add_special_tokens=False, split_special_tokens=True)
            pieces = [([sink, *ids[i:i + max_length - 1]], [False] + [True] * len(ids[i:i + max_length - 1]))
                      for ids in enc["input_ids"] for i in range(0, len(ids), max_length - 1)]
        else:
            enc = tokenizer(texts[start:start + 32], truncation=True, max_length=max_length,
                            return_overflowing_tokens=True, return_special_tokens_mask=True)
            pieces = [(ids, [not s for s in special] if exclude_special else [True] * len(ids))
                      for ids, special in zip(enc["input_ids"], enc["special_tokens_mask"])]
        for ids, splice in pieces:
            if any(splice):
                out.append(Window(list(ids), splice))
                n += sum(splice)
            if n >= max_tokens:
                return out
    return out


def windows_from_store(store: ActivationStore, tokenizer, *, max_tokens: int) -> list[Window]:
    """The store's held-out windows, rebuilt from its token provenance (whole windows only).

    Rows of one window share ``seq``; ``pos`` is each token's place in the model input. With
    ``exclude_special`` the tokenizer adds the special tokens back, and a window is kept only when
    the harvested tokens land exactly where ``pos`` says (the first held-out window may have begun in
    the training split, the last one read may go on further or have been cut by harvest's
    ``max_tokens``: those are left out). A packed store's windows (a causal LM's) are rebuilt with the
    sink token wherever no row was kept; a window cut short is kept, since a causal model's outputs
    on a prefix do not depend on what follows.
    """
    exclude_special = bool(store.source.get("exclude_special", True))
    max_length = int(store.source.get("max_length", 512))
    sink = store.source.get("sink_token_id") if store.source.get("pack") else None
    lo, hi = store.split_range("eval")
    prov = store.provenance(lo, min(hi, lo + max_tokens + 2 * max_length))
    seq, pos, tok = (np.asarray(prov[k]) for k in ("seq", "pos", "token_id"))
    continued = lo > 0 and len(seq) > 0 and int(store.provenance(lo - 1, lo)["seq"][0]) == int(seq[0])
    prefix, suffix = _special_affixes(tokenizer)
    bounds = np.flatnonzero(np.diff(seq)) + 1
    out, n = [], 0
    for s, e in zip(np.r_[0, bounds], np.r_[bounds, len(seq)]):
        order = np.argsort(pos[s:e], kind="stable")
        p, ids = pos[s:e][order].tolist(), tok[s:e][order].tolist()
        if sink is not None:  # packed: every position not kept held the sink token
            if s == 0 and continued:  # the first held-out window began in the training split
                continue
            # a causal LM's window cut short (by the read, or harvest's max_tokens) is still exact
            full, splice = [int(sink)] * (p[-1] + 1), [False] * (p[-1] + 1)
            for q, t in zip(p, ids):
                full[q], splice[q] = t, True
            out.append(Window(full, splice, (lo + s + order).tolist()))
            n += len(p)
            if n >= max_tokens:
                break
            continue
        if exclude_special:
            full = prefix + ids + suffix
            splice = [False] * len(prefix) + [True] * len(ids) + [False] * len(suffix)
            if list(range(len(prefix), len(prefix) + len(ids))) != p:
                continue
        else:
            if p != list(range(len(p))):
                continue
            full, splice = ids, [True] * len(ids)
        if e == len(seq):  # it may go on past what was read, or have been cut by harvest's max_tokens
            break
        out.append(Window(full, splice, (lo + s + order).tolist()))
        n += len(p)
        if n >= max_tokens:
            break
    return out


def _special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence ([CLS] / [SEP] for BERT)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    raise SAERegistryError(f"cannot tell where {type(tokenizer).__name__} puts its special tokens")
