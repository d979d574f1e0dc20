"""Training throughput on real MiniLM activations: our step against a plain dense PyTorch SAE.

Per case the implementations take turns on the same batches, one step each (ours; ours with the
dense backward; the reference), so that anything else running on the machine slows all of them
alike; every step is timed and the medians compared. The encoder product alone, the one
``[batch, dict_size]`` matmul that no top-k trainer can skip, is timed in the same loop: that is
the bound, and "of bound" is our tokens/s as a fraction of what that matmul alone allows.
Then all are evaluated on the store's held-out split after the same tokens (FVU, L0).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import peak_rss_mb, real_store, table, write_results
from torch import nn

D_IN, K, BATCH = 384, 32, 4096
CASES = {  # name -> (sparsity, dict_size, steps)
    "top_k 4096": ("top_k", 4096, 40),
    "top_k 16384": ("top_k", 16384, 16),
    "l1 4096": ("l1", 4096, 30),
}
L1_COEFF = 5e-3


class DenseReference(nn.Module):
    """A plain SAE as most trainers write it: Linear -> ReLU -> top-k -> dense Linear decoder, Adam.

    Every step computes the decoder and both encoder gradients densely: three ``[batch, dict_size]``
    products forward and three backward (the decoder's, its input gradient, the encoder's weight
    gradient; the encoder's input gradient is skipped as the input needs none).
    """

    def __init__(self, sparsity: str, dict_size: int, lr: float) -> None:
        super().__init__()
        self.sparsity = sparsity
        self.encoder = nn.Linear(D_IN, dict_size)
        self.decoder = nn.Linear(dict_size, D_IN)
        self.opt = torch.optim.Adam(self.parameters(), lr=lr)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.encoder(x))
        if self.sparsity == "l1":
            return pre
        values, indices = pre.topk(K, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    def step(self, x: torch.Tensor) -> None:
        h = self.codes(x)
        loss = (self.decoder(h) - x).pow(2).mean()
        if self.sparsity == "l1":
            loss = loss + L1_COEFF * h.abs().sum(-1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> dict:
        from sae_registry import metrics as M

        h = self.codes(x)
        return {"fvu": float(M.fvu(x, self.decoder(h))), "l0": float((h > 0).sum(-1).float().mean())}


def ours(store, sparsity: str, dict_size: int, total_steps: int, sparse_backward: bool = True,
         precision: str = "float32"):
    """Our trainer for one dictionary (the object train() drives), ready to step."""
    from sae_registry import SAEConfig
    from sae_registry.train import TrainConfig, _Member

    sae_cfg = SAEConfig(D_IN, dict_size, K, sparsity)
    cfg = TrainConfig(batch_size=BATCH, tokens=total_steps * BATCH, l1_coeff=L1_COEFF if sparsity == "l1" else None,
                      sparse_backward=sparse_backward, precision=precision, device="cpu").resolved(sae_cfg)
    member = _Member(store, sae_cfg, cfg, Path(tempfile.mkdtemp()), None, None)
    member.init_b_dec(store.read(0, 16_384))
    return member


def run_case(store, name: str, steps: int, batches: list[torch.Tensor], x_eval: torch.Tensor) -> list[dict]:
    from sae_registry.metrics import evaluate

    sparsity, dict_size, _ = CASES[name]
    torch.manual_seed(0)
    scale = math.sqrt(D_IN) / store.mean_norm
    contenders = {"ours": ours(store, sparsity, dict_size, steps)}
    if sparsity == "top_k":
        contenders["ours, bf16 selection"] = ours(store, sparsity, dict_size, steps, precision="bfloat16")
        contenders["ours, dense backward"] = ours(store, sparsity, dict_size, steps, sparse_backward=False)
    reference = DenseReference(sparsity, dict_size, contenders["ours"].cfg.lr)
    bound_w, bound_b = torch.randn(dict_size, D_IN), torch.zeros(dict_size)
    times: dict[str, list[float]] = {n: [] for n in [*contenders, "reference", "bound"]}
    for i in range(steps):
        batch = batches[i % len(batches)]
        for label, member in contenders.items():
            start = time.perf_counter()
            member.train_step(batch, steps)
            times[label].append(time.perf_counter() - start)
            if (i + 1) % member.cfg.eval_every == 0:
                member.refresh_dead()  # what train() does at each evaluation
        start = time.perf_counter()
        reference.step(batch * scale)
        times["reference"].append(time.perf_counter() - start)
        with torch.no_grad():
            start = time.perf_counter()
            torch.addmm(bound_b, batch, bound_w.t())
            times["bound"].append(time.perf_counter() - start)
    skip = 1 if steps > 2 else 0  # the first step allocates
    speed = {n: BATCH / statistics.median(t[skip:]) for n, t in times.items()}
    bound_flops = 2 * BATCH * D_IN * dict_size * speed["bound"] / BATCH
    rows = []
    for label, member in contenders.items():
        member.sae.eval()
        ev = evaluate(member.sae, x_eval).metrics
        rows.append({"case": name, "impl": label, "tokens_per_s": speed[label],
                     "vs_reference": speed[label] / speed["reference"],
                     "of_bound": speed[label] / speed["bound"] if sparsity == "top_k" else None,
                     "fvu": ev["fvu"], "l0": ev["l0"]})
    ref_ev = reference.evaluate(x_eval * scale)
    rows.append({"case": name, "impl": "dense reference", "tokens_per_s": speed["reference"], "vs_reference": 1.0,
                 "of_bound": speed["reference"] / speed["bound"] if sparsity == "top_k" else None, **ref_ev})
    rows.append({"case": name, "impl": "bound: encoder matmul alone", "tokens_per_s": speed["bound"],
                 "vs_reference": speed["bound"] / speed["reference"], "gflops": bound_flops / 1e9})
    for row in rows:
        row["tokens"] = steps * BATCH
    return rows


MEMORY_PROBE = """
import sys; sys.path.insert(0, "benchmarks")
import torch, train_speed as T
from common import real_store
store = real_store(); batch = store.read(0, T.BATCH)
sparsity, dict_size, _ = T.CASES[{case!r}]
if {impl!r} == "reference":
    m = T.DenseReference(sparsity, dict_size, 1e-4); step = lambda: m.step(batch)
else:
    m = T.ours(store, sparsity, dict_size, 3, sparse_backward={impl!r} != "dense",
               precision="bfloat16" if {impl!r} == "bf16" else "float32")
    step = lambda: m.train_step(batch, 3)
for _ in range(3): step()
"""


def end_to_end(store, dict_size: int, steps: int) -> float:
    """Our tokens/s through train() itself: batches streamed from the store, evaluations included."""
    from sae_registry import SAEConfig
    from sae_registry.train import TrainConfig, train

    result = train(store, SAEConfig(D_IN, dict_size, K), TrainConfig(tokens=steps * BATCH, batch_size=BATCH, device="cpu"),
                   tempfile.mkdtemp(), progress=False)
    return result.tokens_per_second


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every case's step count")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    args = parser.parse_args(argv)

    store = real_store()
    x_eval = store.read_split("eval", max_tokens=16_384)
    batches = list(store.batches(BATCH, seed=0, drop_last=True))
    rows = []
    for name in args.cases:
        steps = max(3, round(CASES[name][2] * args.steps_scale))
        print(f"training {name}: {steps} steps of {BATCH} tokens each, implementations in turn", flush=True)
        case_rows = run_case(store, name, steps, batches, x_eval)
        if CASES[name][0] == "top_k":
            case_rows.insert(1, {"case": name, "impl": "ours, train() from the store",
                                 "tokens_per_s": end_to_end(store, CASES[name][1], steps), "tokens": steps * BATCH})
            case_rows[1]["vs_reference"] = case_rows[1]["tokens_per_s"] / next(
                r["tokens_per_s"] for r in case_rows if r["impl"] == "dense reference")
        if not args.no_memory:
            for row in case_rows:
                impl = {"ours": "ours", "ours, bf16 selection": "bf16", "ours, dense backward": "dense",
                        "dense reference": "reference"}.get(row["impl"])
                if impl:
                    row["peak_rss_mb"] = peak_rss_mb(MEMORY_PROBE.format(case=name, impl=impl))
        rows += case_rows
        print(flush=True)
    print(table(rows, [("case", "case", ""), ("impl", "implementation", ""), ("tokens_per_s", "tokens/s", ",.0f"),
                       ("vs_reference", "x reference", ".2f"), ("of_bound", "of bound", ".0%"),
                       ("gflops", "GFLOP/s", ".1f"), ("fvu", "FVU", ".4f"), ("l0", "L0", ".1f"),
                       ("tokens", "tokens", ",d"), ("peak_rss_mb", "peak RSS MiB", ",.0f")]))
    path = write_results("train_speed", {"rows": rows, "batch_size": BATCH, "d_in": D_IN, "k": K})
    print(f"\nwritten {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
