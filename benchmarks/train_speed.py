"""Training throughput on real MiniLM activations: our step against a plain dense PyTorch SAE and SAELens.

Per case the implementations take turns on the same batches, one step each (ours; ours with the
dense backward; the reference; SAELens), so that anything else running on the machine slows all of
them alike; every step is timed and the medians compared. The encoder product alone, the one
``[batch, dict_size]`` matmul that no top-k trainer can skip, is timed in the same loop: that is
the bound, and "of bound" is our tokens/s as a fraction of what that matmul alone allows.
Then all are evaluated on the store's held-out split after the same tokens (FVU, L0). l1 and
jumprelu start dense and switch to the sparse step once fewer than ``SPARSE_BELOW`` (5 %) of their
latents are active: a row gives our tokens/s over those steps alone, against the reference's same steps.

The cases: top_k at dict_size 4096 and 16384, and l1, batch_top_k, matryoshka (prefixes 256, 1024,
4096) and jumprelu at 4096; d 384, k 32, batch 4096. For each rule the dense reference is that
rule as most trainers write it (``DenseReference``). batch_top_k, matryoshka and jumprelu also
race SAELens's own training step: its ``BatchTopKTrainingSAE``, ``MatryoshkaBatchTopKTrainingSAE``
or ``JumpReLUTrainingSAE`` driven by ``SAETrainer.step`` (forward, dead-latent counts, backward,
gradient-norm clip, Adam at our learning rate, its defaults otherwise), on the same scaled batches;
a SAELens without the class gets a row saying so. Their 196 steps are 803 k tokens.

batch_top_k and matryoshka are evaluated with the training rule for all three (the k * 4096
largest of each 4096-token held-out batch: L0 32 for all, so their FVUs compare); jumprelu with
its thresholds. jumprelu's L0 coefficient ``L0_COEFF`` is SAELens's default, 1.0, in its units
(MSE summed over d; ours and the reference take ``L0_COEFF / d``). In a run this short the
coefficient does not set L0; the first threshold does. A short look (ours, 196 steps of 1024
tokens): from SAELens's first threshold, 0.01, L0 was 734 after 196 steps at coefficient 1, 10
and 40 alike (Adam moves a threshold by about lr, 0.001, per step whatever the gradient's size,
and the encoder's outputs grow faster); from 0.2 it was 253, from 0.3 161, from 0.5 33 at step
147 and 44 at 196. So all three start at ``INIT_THRESHOLD`` 0.5 (at initialisation about 0.23 is
exceeded by 32 of the 4096 encoder outputs; the reference starts as SAELens and we do, decoder
rows at norm 0.1 and the encoder their transpose).
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

from sae_registry.architectures.catalogue import SPARSE_BELOW

D_IN, K, BATCH = 384, 32, 4096
CASES = {  # name -> (sparsity, dict_size, steps)
    "top_k 4096": ("top_k", 4096, 40),
    "top_k 16384": ("top_k", 16384, 16),
    "l1 4096": ("l1", 4096, 100),
    "batch_top_k 4096": ("batch_top_k", 4096, 196),
    "matryoshka 4096": ("matryoshka", 4096, 196),
    "jumprelu 4096": ("jumprelu", 4096, 196),
}
L1_COEFF = 1e-2  # ours's active fraction falls under SPARSE_BELOW after about 50 steps: half the case is sparse
PREFIXES = (256, 1024, 4096)  # matryoshka: our default for 4096 (dict_size / 16, / 4, / 1)
L0_COEFF = 1.0  # jumprelu, in SAELens's units; ours and the reference take L0_COEFF / D_IN (module doc)
BANDWIDTH, INIT_THRESHOLD = 0.05, 0.5  # jumprelu: the kernel's width, the first thresholds (all three; module doc)
# the rules SAELens races in: sparsity -> (training SAE class, its config class) in sae_lens.saes
SAELENS = {
    "batch_top_k": ("BatchTopKTrainingSAE", "BatchTopKTrainingSAEConfig"),
    "matryoshka": ("MatryoshkaBatchTopKTrainingSAE", "MatryoshkaBatchTopKTrainingSAEConfig"),
    "jumprelu": ("JumpReLUTrainingSAE", "JumpReLUTrainingSAEConfig"),
}


class JumpReLUFn(torch.autograd.Function):
    """``x * (x > t)`` (``step=False``) or ``x > t`` (``step=True``), with Rajamanoharan et al.'s
    pseudo-derivatives in ``t`` (rectangle kernel K of width eps): d/dt = -(t / eps) K((x - t) / eps)
    for JumpReLU, -(1 / eps) K(...) for the step; d/dx = (x > t) for JumpReLU, none for the step."""

    @staticmethod
    def forward(ctx, x, t, eps, step):
        ctx.save_for_backward(x, t)
        ctx.eps, ctx.step = eps, step
        above = (x > t).to(x.dtype)
        return above if step else x * above

    @staticmethod
    def backward(ctx, grad):
        x, t = ctx.saved_tensors
        kernel = ((x - t).abs() < ctx.eps / 2).to(x.dtype) / ctx.eps
        grad_t = (-(kernel if ctx.step else t * kernel) * grad).sum(0)
        return None if ctx.step else (x > t).to(x.dtype) * grad, grad_t, None, None


class DenseReference(nn.Module):
    """A plain SAE as most trainers write it: Linear -> the rule -> dense Linear decoder, Adam.

    The rules: top_k, the k largest of ReLU(pre) per row; l1, ReLU(pre) and an L1 penalty;
    batch_top_k, the k * batch largest of the whole batch's ReLU(pre); matryoshka, batch_top_k's
    codes with the loss summed over the reconstructions of the nested prefixes ``PREFIXES``;
    jumprelu, ``pre * (pre > threshold_i)`` with a straight-through estimator for the thresholds
    and an L0 penalty. Every step computes the decoder and both encoder gradients densely: three
    ``[batch, dict_size]`` products forward and three backward (the decoder's, its input gradient,
    the encoder's weight gradient; the encoder's input gradient is skipped as the input needs none).
    """

    def __init__(self, sparsity: str, dict_size: int, lr: float) -> None:
        super().__init__()
        self.sparsity = sparsity
        self.encoder = nn.Linear(D_IN, dict_size)
        self.decoder = nn.Linear(dict_size, D_IN)
        if sparsity == "jumprelu":  # as SAELens: decoder rows at norm 0.1, the encoder their transpose
            self.threshold = nn.Parameter(torch.full((dict_size,), INIT_THRESHOLD))
            with torch.no_grad():
                self.decoder.weight.mul_(0.1 / self.decoder.weight.norm(dim=0))
                self.encoder.weight.copy_(self.decoder.weight.t())
                self.encoder.bias.zero_()
        self.opt = torch.optim.Adam(self.parameters(), lr=lr)

    def codes(self, pre: torch.Tensor) -> torch.Tensor:
        if self.sparsity == "jumprelu":
            return JumpReLUFn.apply(pre, self.threshold, BANDWIDTH, False)
        pre = F.relu(pre)
        if self.sparsity == "l1":
            return pre
        if self.sparsity in ("batch_top_k", "matryoshka"):
            values, indices = pre.flatten().topk(K * len(pre))
            return torch.zeros_like(pre).flatten().scatter(0, indices, values).view_as(pre)
        values, indices = pre.topk(K, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    def step(self, x: torch.Tensor) -> None:
        pre = self.encoder(x)
        h = self.codes(pre)
        if self.sparsity == "matryoshka":
            w, b = self.decoder.weight, self.decoder.bias
            loss = sum((h[:, :end] @ w[:, :end].t() + b - x).pow(2).mean() for end in PREFIXES)
        else:
            loss = (self.decoder(h) - x).pow(2).mean()
        if self.sparsity == "l1":
            loss = loss + L1_COEFF * h.abs().sum(-1).mean()
        if self.sparsity == "jumprelu":
            l0 = JumpReLUFn.apply(pre, self.threshold, BANDWIDTH, True).sum(-1).mean()
            loss = loss + L0_COEFF / D_IN * l0
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.sparsity == "jumprelu":
            with torch.no_grad():
                self.threshold.clamp_(min=0.0)  # below zero the gate would pass negative outputs

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> dict:
        return held_out(lambda xb: self.codes(self.encoder(xb)), self.decoder, x)


@torch.no_grad()
def held_out(encode, decode, x: torch.Tensor) -> dict:
    """FVU and mean L0 on ``x``, encoded ``BATCH`` tokens at a time (a batch rule selects within each)."""
    from sae_registry.metrics import reconstruction as M

    codes = [encode(xb) for xb in x.split(BATCH)]
    recon = torch.cat([decode(h) for h in codes])
    return {"fvu": float(M.fvu(x, recon)), "l0": float(torch.cat([(h > 0).sum(-1) for h in codes]).float().mean())}


def saelens(sparsity: str, dict_size: int, lr: float, steps: int, init_threshold: float = INIT_THRESHOLD,
            target_l0: float | None = None):
    """SAELens's trainer of its own training SAE for ``sparsity``, to be driven by ``.step(batch)``.

    Built in code (no hub, no wandb): its defaults but for the shape, k, the matryoshka widths,
    jumprelu's L0 coefficient, bandwidth, first threshold and target L0 (its quadratic mode when
    given), and the learning rate. Raises
    LookupError when this SAELens lacks the class.
    """
    try:
        import sae_lens
        from sae_lens import saes
        from sae_lens.config import SAETrainerConfig
        from sae_lens.training.sae_trainer import SAETrainer
    except ImportError as e:
        raise LookupError(f"sae_lens not importable ({e})") from None
    sae_class, cfg_class = (getattr(saes, name, None) for name in SAELENS[sparsity])
    if sae_class is None or cfg_class is None:
        raise LookupError(f"sae_lens {sae_lens.__version__} has no {SAELENS[sparsity][0]}")
    options = {"batch_top_k": {"k": K}, "matryoshka": {"k": K, "matryoshka_widths": list(PREFIXES)},
               "jumprelu": {"l0_coefficient": L0_COEFF, "jumprelu_bandwidth": BANDWIDTH,
                            "jumprelu_init_threshold": init_threshold,
                            **({"jumprelu_sparsity_loss_mode": "quadratic", "target_l0": target_l0}
                               if target_l0 is not None else {})}}[sparsity]
    sae = sae_class(cfg_class(d_in=D_IN, d_sae=dict_size, device="cpu", **options))
    # lr_end: the runner config's default, which the trainer asks for (its constant schedule ignores it)
    cfg = SAETrainerConfig(total_training_samples=steps * BATCH, train_batch_size_samples=BATCH, lr=lr,
                           lr_end=lr / 10, device="cpu")
    return SAETrainer(cfg, sae, data_provider=iter(()))


def ours(store, sparsity: str, dict_size: int, total_steps: int, sparse_backward: bool = True,
         precision: str = "float32", lr: float | None = None, init_threshold: float = INIT_THRESHOLD,
         target_l0: float | None = None, threshold_lr_scale: float = 1.0):
    """Our trainer for one dictionary (the object train() drives), ready to step (``lr``: the rule's default when None)."""
    from sae_registry import SAEConfig
    from sae_registry.training.loop import TrainConfig, _Member

    sae_cfg = SAEConfig(D_IN, dict_size, K, sparsity, prefixes=PREFIXES if sparsity == "matryoshka" else None)
    cfg = TrainConfig(batch_size=BATCH, tokens=total_steps * BATCH, l1_coeff=L1_COEFF if sparsity == "l1" else None,
                      **({"l0_coeff": L0_COEFF / D_IN, "jumprelu_bandwidth": BANDWIDTH,
                          "jumprelu_init_threshold": init_threshold, "target_l0": target_l0,
                          "threshold_lr_scale": threshold_lr_scale}
                         if sparsity == "jumprelu" else {}),
                      lr=lr, sparse_backward=sparse_backward, precision=precision, device="cpu").resolved(sae_cfg)
    member = _Member(store, sae_cfg, cfg, Path(tempfile.mkdtemp()), None, None)
    member.init_b_dec(store.read(0, 16_384))
    return member


def evaluate_ours(member, x_eval: torch.Tensor) -> dict:
    """Our FVU and L0 on the held-out split; batch_top_k and matryoshka by the training rule, as the others."""
    from sae_registry.architectures.batch_top_k import UNSET
    from sae_registry.metrics.reconstruction import evaluate

    sae = member.sae.eval()
    if sae.cfg.sparsity in ("batch_top_k", "matryoshka"):
        sae.encoder.threshold.fill_(UNSET)  # unset: each batch's own k * batch largest
    return evaluate(sae, x_eval, batch_size=BATCH).metrics


def run_case(store, name: str, steps: int, batches: list[torch.Tensor], x_eval: torch.Tensor) -> list[dict]:
    sparsity, dict_size, _ = CASES[name]
    torch.manual_seed(0)
    scale = math.sqrt(D_IN) / store.mean_norm
    contenders = {"ours": ours(store, sparsity, dict_size, steps)}
    if sparsity == "top_k":
        contenders["ours, bf16 selection"] = ours(store, sparsity, dict_size, steps, precision="bfloat16")
        contenders["ours, dense backward"] = ours(store, sparsity, dict_size, steps, sparse_backward=False)
    lr = contenders["ours"].cfg.lr
    reference = DenseReference(sparsity, dict_size, lr)
    lens, lens_row = None, None
    if sparsity in SAELENS:
        try:
            lens = saelens(sparsity, dict_size, lr, steps)
            lens_row = {"case": name, "impl": f"SAELens {type(lens.sae).__name__}"}
        except LookupError as e:
            lens_row = {"case": name, "impl": f"SAELens: {e}"}
    bound_w, bound_b = torch.randn(dict_size, D_IN), torch.zeros(dict_size)
    times: dict[str, list[float]] = {n: [] for n in [*contenders, "reference", "saelens", "bound"]}
    sparse_steps = []  # l1, jumprelu: the steps ours took on the active entries only
    for i in range(steps):
        batch = batches[i % len(batches)]
        if sparsity in ("l1", "jumprelu") and contenders["ours"].sae.active_fraction < SPARSE_BELOW:
            sparse_steps.append(i)
        for label, member in contenders.items():
            start = time.perf_counter()
            member.train_step(batch, steps)
            times[label].append(time.perf_counter() - start)
            if (i + 1) % member.cfg.eval_every == 0:
                member.refresh_dead()  # what train() does at each evaluation
        start = time.perf_counter()
        reference.step(batch * scale)
        times["reference"].append(time.perf_counter() - start)
        if lens is not None:
            start = time.perf_counter()
            lens.step(batch * scale)  # its own step; fit() then counts it
            lens.n_training_steps += 1
            times["saelens"].append(time.perf_counter() - start)
        with torch.no_grad():
            start = time.perf_counter()
            torch.addmm(bound_b, batch, bound_w.t())
            times["bound"].append(time.perf_counter() - start)
    skip = 1 if steps > 2 else 0  # the first step allocates
    speed = {n: BATCH / statistics.median(t[skip:]) for n, t in times.items() if t}
    bound_flops = 2 * BATCH * D_IN * dict_size * speed["bound"] / BATCH
    rows = []
    for label, member in contenders.items():
        ev = evaluate_ours(member, x_eval)
        rows.append({"case": name, "impl": label, "tokens_per_s": speed[label],
                     "vs_reference": speed[label] / speed["reference"],
                     "of_bound": speed[label] / speed["bound"] if sparsity == "top_k" else None,
                     "fvu": ev["fvu"], "l0": ev["l0"]})
    ref_ev = reference.evaluate(x_eval * scale)
    if len(sparse_steps) > 2:  # the same steps of each, once ours's active fraction fell under SPARSE_BELOW
        on = {n: BATCH / statistics.median([times[n][i] for i in sparse_steps]) for n in ("ours", "reference")}
        rows.append({"case": name, "impl": f"ours, its {len(sparse_steps)} sparse steps", "tokens_per_s": on["ours"],
                     "vs_reference": on["ours"] / on["reference"]})
    rows.append({"case": name, "impl": "dense reference", "tokens_per_s": speed["reference"], "vs_reference": 1.0,
                 "of_bound": speed["reference"] / speed["bound"] if sparsity == "top_k" else None, **ref_ev})
    if lens is not None:
        lens.sae.eval()
        lens_ev = held_out(lens.sae.encode, lens.sae.decode, x_eval * scale)
        lens_row.update(tokens_per_s=speed["saelens"], vs_reference=speed["saelens"] / speed["reference"], **lens_ev)
        for row in rows:
            row["vs_saelens"] = row["tokens_per_s"] / speed["saelens"]
        lens_row["vs_saelens"] = 1.0
    if lens_row is not None:
        rows.append(lens_row)
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
elif {impl!r} == "saelens":
    m = T.saelens(sparsity, dict_size, 1e-4, 3); step = lambda: m.step(batch)
else:
    m = T.ours(store, sparsity, dict_size, 3, sparse_backward={impl!r} != "dense",
               precision="bfloat16" if {impl!r} == "bf16" else "float32")
    step = lambda: m.train_step(batch, 3)
for _ in range(3): step()
"""


def end_to_end(store, dict_size: int, steps: int) -> float:
    """Our tokens/s through train() itself: batches streamed from the store, evaluations included."""
    from sae_registry import SAEConfig
    from sae_registry.training.loop import TrainConfig, train

    result = train(store, SAEConfig(D_IN, dict_size, K), TrainConfig(tokens=steps * BATCH, batch_size=BATCH, device="cpu"),
                   tempfile.mkdtemp(), progress=False)
    return result.tokens_per_second


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every case's step count")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--no-write", action="store_true",
                        help="print the table only, leaving benchmarks/results/train_speed.json as it is (smoke runs)")
    parser.add_argument("--results", default="train_speed",
                        help="the results file's name in benchmarks/results/ (train_speed_rules: the rules' cases)")
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
                if row["impl"].startswith("SAELens ") and "tokens_per_s" in row:
                    impl = "saelens"
                if impl:
                    row["peak_rss_mb"] = peak_rss_mb(MEMORY_PROBE.format(case=name, impl=impl))
        rows += case_rows
        print(flush=True)
    print(table(rows, [("case", "case", ""), ("impl", "implementation", ""), ("tokens_per_s", "tokens/s", ",.0f"),
                       ("vs_reference", "x reference", ".2f"), ("vs_saelens", "x SAELens", ".2f"),
                       ("of_bound", "of bound", ".0%"),
                       ("gflops", "GFLOP/s", ".1f"), ("fvu", "FVU", ".4f"), ("l0", "L0", ".1f"),
                       ("tokens", "tokens", ",d"), ("peak_rss_mb", "peak RSS MiB", ",.0f")]))
    if not args.no_write:
        path = write_results(args.results, {"rows": rows, "batch_size": BATCH, "d_in": D_IN, "k": K})
        print(f"\nwritten {path}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
