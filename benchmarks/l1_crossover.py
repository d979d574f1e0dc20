"""Where l1's sparse step starts to beat its dense one: step time at a held active fraction.

An l1 (or jumprelu) dictionary takes the sparse step (the encoder's backward and the decoder on the
active entries only) once fewer than ``config.SPARSE_BELOW`` of its codes are active. This times one
optimiser step of each path on the demo store's batches at active fractions set by hand: the encoder
bias is moved so that the fraction asked for is positive, and every learning rate is 0 so that it
stays there. One thread, as a sweep's trial of one CPU runs. Printed: each path's median step and
dense / sparse (above 1: the sparse step is faster).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import real_store, table, write_results

from sae_registry.architectures import base as sparsity  # SPARSE_BELOW is read there
from sae_registry.config.options import SAEConfig, TrainConfig
from sae_registry.training.loop import _Member, check_pack


def step_seconds(store, batches: list[torch.Tensor], dict_size: int, fraction: float, sparse: bool,
                 device: str = "cpu") -> float:
    """The median seconds of one training step at ``fraction`` active, on the sparse or the dense path
    (the first step not counted); the GPU check calls it with ``device="cuda"``."""
    threshold = sparsity.SPARSE_BELOW
    sparsity.SPARSE_BELOW = 2.0 if sparse else 0.0  # the path chosen, whatever the fraction
    sae_cfg = SAEConfig(input_size=store.d, dict_size=dict_size, sparsity="l1")
    cuda = device.startswith("cuda")
    try:
        with tempfile.TemporaryDirectory() as out:
            cfg = check_pack(store, [(sae_cfg, TrainConfig(batch_size=len(batches[0]), l1_coeff=0.003, device=device),
                                      out)])[0]
            member = _Member(store, sae_cfg, cfg, Path(out), None, None)
            member.init_b_dec(batches[0])
            batches = [b.to(device) for b in batches]
            with torch.no_grad():
                pre = (batches[0] * member.scale - member.sae.b_dec) @ member.sae.encoder.encoder.weight.T
                sample = pre.flatten()[::max(1, pre.numel() // 2**20)].float().cpu()  # quantile's size limit
                member.sae.encoder.encoder.bias.fill_(-float(torch.quantile(sample, 1 - fraction)))
                del pre
            member.sae.active_fraction = fraction
            for group in member.opt.param_groups:
                group["scale"] = 0.0  # no parameter moves: the fraction stays where it was set
            times = []
            for batch in batches:
                if cuda:
                    torch.cuda.synchronize()
                started = time.perf_counter()
                member.train_step(batch, len(batches))
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
    finally:
        sparsity.SPARSE_BELOW = threshold
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dict-sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.03, 0.06, 0.1, 0.15, 0.2, 0.3])
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    store = real_store()
    batches = list(itertools.islice(store.batches(args.batch_size, seed=1, drop_last=True), args.steps))
    rows = []
    for dict_size, fraction in itertools.product(args.dict_sizes, args.fractions):
        dense, sparse = (step_seconds(store, batches, dict_size, fraction, s) for s in (False, True))
        rows.append({"dict_size": dict_size, "fraction": fraction, "dense_ms": dense * 1e3,
                     "sparse_ms": sparse * 1e3, "ratio": dense / sparse})
        print(f"d {dict_size}, {fraction:.0%} active: dense {dense * 1e3:.1f} ms, sparse {sparse * 1e3:.1f} ms",
              flush=True)
    print(f"\none l1 step, batch {args.batch_size}, d_in {store.d}, one thread; the sparse step is taken under "
          f"{sparsity.SPARSE_BELOW:.0%} active")
    print(table(rows, [("dict_size", "dict_size", ""), ("fraction", "active", ".0%"), ("dense_ms", "dense ms", ".1f"),
                       ("sparse_ms", "sparse ms", ".1f"), ("ratio", "dense / sparse", ".2f")]))
    print(f"\nwritten {write_results('l1_crossover', {'batch_size': args.batch_size, 'rows': rows})}")


if __name__ == "__main__":
    main()
