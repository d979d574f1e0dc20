"""One training run: activations (a store, an array: any ``ActivationSource``) and two configs in, a saved
dictionary and its metrics out.

The recipe (each part a :class:`TrainConfig` option, defaults after Gao et al. 2024 and Anthropic's
"Towards Monosemanticity" updates):

- inputs scaled by one constant so that their mean norm is ``sqrt(d)`` (``normalize_inputs``); the
  constant is stored with the model as ``input_scale``;
- decoder rows at unit norm after every step, with the gradient component that would change a
  row's norm removed before the step (``unit_norm_decoder``);
- encoder initialised to the decoder's transpose (``encoder_init``; ``kaiming`` for nn.Linear's own),
  scaled by 0.1 for l1, whose codes start dense (``encoder_init_scale``);
- decoder bias initialised to the geometric median of a data sample (``b_dec_init``);
- top_k, batch_top_k, matryoshka: an auxiliary loss that lets the top ``aux_k`` dead latents model
  the residual (``aux_coeff``, ``dead_after_tokens``); l1 and jumprelu: the L1 / L0 coefficient
  ramped up over the first ``l1_warmup_fraction`` of steps;
- each rule's own terms and updates (:mod:`sae_registry.architectures`: JumpReLU's L0 penalty and
  threshold estimator, BatchTopK's inference threshold, Matryoshka's prefix losses);
- Adam with a learning rate that decays linearly to zero over the last ``lr_decay_fraction``; the
  decoder in a group of its own, at ``decoder_lr_scale`` times the rate, and jumprelu's thresholds in
  another, at ``threshold_lr_scale`` times it.

Knows nothing of Ray or MLflow: callers watch progress through ``callback(step, metrics)``.
Checkpoints (:mod:`sae_registry.training.checkpoints`: safetensors + JSON, no pickle) let a stopped run resume exactly.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm

# the configurations live in config/options.py (no torch there: the CLI builds its options from them)
from ..config.options import PACK_SHARED, SAEConfig, TrainConfig
from ..errors import SAERegistryError
from ..metrics.reconstruction import Evaluation, evaluate
from ..model.sae import SparseAutoencoder
from ..store.source import ActivationSource
from .checkpoints import load_checkpoint, save_checkpoint, writing_to

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.json"
EVAL_BATCH = 4096  # rows a final evaluation holds at once
CALIBRATION_BATCHES = 8  # training batches a rule's inference estimate is measured on at the end

Callback = Callable[[int, dict, "Path | None"], None]  # (step, metrics, checkpoint just written)


@contextmanager
def threads_fit_to_cpus() -> Iterator[int]:
    """For the duration of the block, torch's thread count lowered to the CPUs this process may use.

    torch starts one thread per physical core of the machine; in a container, under ``taskset`` or
    in a Ray worker given fewer CPUs, more threads than CPUs makes every OpenMP barrier wait on a
    descheduled thread (on a 2-core machine with one other busy process, small ops of a step ran
    up to 20x slower). Only ever lowers: a count set on purpose (a Ray trial's CPUs,
    ``OMP_NUM_THREADS``) stays. The caller's count is restored on the way out: training is a
    library call, and the process's thread setting is the caller's.
    """
    before = torch.get_num_threads()
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if before > available:
        torch.set_num_threads(available)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def changed(old: dict, new: dict) -> str:
    """What differs between two option dicts (nested ones flattened), in words: ``dict_size was 32, now 64``."""
    said = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            said += [part for part in [changed(a, b)] if part]
        elif a != b:
            said.append(f"{key} was {a!r}, now {b!r}")
    return "; ".join(said)


@dataclass
class TrainResult:
    sae: SparseAutoencoder
    metrics: dict[str, float]  # final evaluation on the held-out split
    evaluation: Evaluation  # the same, with per-latent density and per-token L0
    history: list[dict]  # one entry per evaluation: step, tokens, train and eval numbers
    out_dir: Path
    tokens_per_second: float


def geometric_median(x: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance to rows of ``x``."""
    median = x.mean(0)
    for _ in range(iters):
        weights = 1.0 / (x - median).norm(dim=1).clamp_min(1e-8)
        new = (weights[:, None] * x).sum(0) / weights.sum()
        if (new - median).norm() <= tol * median.norm().clamp_min(1e-8):
            return new
        median = new
    return median


def _lr_factor(step: int, total: int, decay_fraction: float) -> float:
    decay_steps = int(total * decay_fraction)
    if decay_steps == 0 or step < total - decay_steps:
        return 1.0
    return max(0.0, (total - step) / decay_steps)


# Options every member of a pack must share: they read one batch stream and evaluate together.


class _Member:
    """One dictionary in training: model, optimiser, dead-latent counters, running sums, history."""

    def __init__(self, store: ActivationSource, sae_cfg: SAEConfig, cfg: TrainConfig, out_dir: Path,
                 callback: Callback | None, extra: dict | None) -> None:
        if sae_cfg.input_size != store.d:
            raise SAERegistryError(
                f"the SAE's input_size ({sae_cfg.input_size}) differs from the store's d ({store.d})"
            )
        self.sae_cfg, self.cfg, self.out_dir = sae_cfg, cfg, out_dir
        self.callback, self.extra = callback, extra
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.sae = SparseAutoencoder(sae_cfg)  # encoder = decoder transpose (Gao et al.)
        if cfg.encoder_init == "kaiming":
            self.sae.encoder.encoder.reset_parameters()
        else:
            # l1 codes start dense: with encoder = decoder^T at full scale thousands of latents each
            # add a unit vector and the first reconstructions are many times the input (FVU ~12
            # after 12 steps on MiniLM, 0.4 at 0.1; Anthropic's 2024 recipe also starts at 0.1)
            with torch.no_grad():
                self.sae.encoder.encoder.weight.mul_(cfg.encoder_init_scale)
        self.scale = math.sqrt(store.d) / store.mean_norm if cfg.normalize_inputs else 1.0
        self.sae.encoder.input_scale.fill_(self.scale)
        rule = self.sae.rule
        rule.init(self.sae, cfg)
        self.sae.to(self.device).train()
        self.select_dtype = None
        if cfg.precision == "bfloat16":
            if sae_cfg.sparsity != "top_k" or not cfg.sparse_backward:
                raise SAERegistryError("precision: bfloat16 needs sparsity top_k with sparse_backward; use float32")
            self.select_dtype = torch.bfloat16
        # fused: one kernel for all of Adam's updates (about 10x foreach's speed on CPU)
        # the decoder, and jumprelu's learned thresholds, in groups of their own rate
        threshold = getattr(self.sae.encoder, "threshold", None)
        own = [(self.sae.W_dec, cfg.decoder_lr_scale)]
        if isinstance(threshold, torch.nn.Parameter):
            own.append((threshold, cfg.threshold_lr_scale))
        rest = [p for p in self.sae.parameters() if all(p is not q for q, _ in own)]
        self.opt = torch.optim.Adam([{"params": rest, "scale": 1.0}, *({"params": [p], "scale": s} for p, s in own)],
                                    lr=cfg.lr, eps=6.25e-10, fused=True)
        self.since_fired = torch.zeros(sae_cfg.dict_size, dtype=torch.long, device=self.device)
        self.dead = torch.zeros(0, dtype=torch.long, device=self.device)
        # Running sums stay on the device: one host sync per evaluation, not per step.
        # sums between evaluations of loss, mse, l0 and the terms the rule names (StepLoss.terms), in
        # the order of running_names: one tensor, one add per step, one host sync per evaluation
        self.running_names: tuple[str, ...] = ()
        self.running: torch.Tensor | None = None
        self.running_steps = 0
        self.step, self.history = 0, []
        self.identity = {"sae": sae_cfg.to_dict(), "train": cfg.to_dict(), "store_fingerprint": store.fingerprint}
        out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_DIR

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor) -> None:
        if self.cfg.b_dec_init == "zeros":
            return
        x = sample * self.scale
        self.sae.b_dec.copy_(geometric_median(x) if self.cfg.b_dec_init == "geometric_median" else x.mean(0))

    def resume(self) -> None:
        state = load_checkpoint(self.checkpoint_path, self.sae, self.opt, self.since_fired)
        if differ := changed({k: state[k] for k in self.identity}, json.loads(json.dumps(self.identity))):
            raise SAERegistryError(
                f"the checkpoint in {self.checkpoint_path} was made with other options: {differ}; resume with "
                "the same ones, train into a new --out directory, or drop --resume to start over"
            )
        self.step, self.history = state["step"], state["history"]
        self.refresh_dead()

    def checkpoint(self) -> None:
        self.refresh_dead()  # so that a run resumed from here uses the same dead set as this one
        save_checkpoint(self.checkpoint_path, self.sae, self.opt, self.since_fired,
                         {**self.identity, "step": self.step, "history": self.history})

    def refresh_dead(self) -> None:
        """Recompute the ids of dead latents (a host sync, so done at evaluations, not every step)."""
        self.dead = (self.since_fired >= self.cfg.dead_after_tokens).nonzero().flatten()

    def train_step(self, batch: torch.Tensor, total_steps: int) -> None:
        """One optimiser step. Nothing in it waits for the device: no ``.item()``, no boolean
        indexing; the dead-latent set it uses is the one found at the last evaluation."""
        cfg, sae = self.cfg, self.sae
        x = batch * self.scale
        out = sae.forward_train(x, sparse_backward=cfg.sparse_backward, select_dtype=self.select_dtype, cfg=cfg)
        ramp = min(1.0, (self.step + 1) / max(1.0, cfg.l1_warmup_fraction * total_steps))
        loss, terms = sae.rule.loss(sae, x, out, cfg, ramp, self.dead)
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr * group["scale"] * _lr_factor(self.step, total_steps, cfg.lr_decay_fraction)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.unit_norm_decoder:
            sae.remove_parallel_grads_()
        self.opt.step()
        if cfg.unit_norm_decoder:
            sae.normalize_decoder_()
        sae.rule.after_step(sae, out, cfg, self.step)
        with torch.no_grad():
            fired, l0 = sae.rule.stats(out, len(x), sae.cfg.dict_size)
            self.since_fired += len(x)
            self.since_fired.masked_fill_(fired, 0)
            mse = (out.reconstruction - x).pow(2).mean()
            measured = {"loss": loss, "mse": mse, "l0": l0, **terms}
            values = torch.stack([value.detach().float().reshape(()) for value in measured.values()])
            if self.running is None:
                self.running_names, self.running = tuple(measured), values
            else:
                self.running += values
        self.running_steps += 1
        self.step += 1

    def evaluate_and_report(self, x_eval: torch.Tensor, elapsed: float, start_step: int, checkpoint: bool) -> dict:
        cfg = self.cfg
        self.sae.eval()
        ev = evaluate(self.sae, x_eval).metrics
        self.sae.train()
        self.refresh_dead()
        entry = {
            "step": self.step,
            "tokens": self.step * cfg.batch_size,
            **({f"train/{name}": mean for name, mean in
                zip(self.running_names, (self.running / self.running_steps).tolist(), strict=True)}
               if self.running is not None else dict.fromkeys(("train/loss", "train/mse", "train/l0"), 0.0)),
            "train/dead_fraction": float((self.since_fired >= cfg.dead_after_tokens).float().mean()),
            "lr": self.opt.param_groups[0]["lr"],
            "tokens_per_second": (self.step - start_step) * cfg.batch_size / max(elapsed, 1e-9),
            **{f"eval/{k}": v for k, v in ev.items()},
        }
        self.history.append(entry)
        self.running = None
        self.running_steps = 0
        if not math.isfinite(entry["train/loss"]):
            raise SAERegistryError(f"training diverged at step {self.step} (loss is {entry['train/loss']}); lower --lr")
        if checkpoint:
            self.checkpoint()
        if self.callback is not None:
            self.callback(self.step, entry, self.checkpoint_path if checkpoint else None)
        return entry

    def finish(self, store: ActivationSource, tokens_per_second: float) -> TrainResult:
        self.sae.eval()
        self.sae.rule.calibrate(self.sae, islice(store.batches(self.cfg.batch_size, split="train", shuffle=False),
                                                 CALIBRATION_BATCHES))
        # batch by batch from the store: the held-out split of a large store does not fit in memory
        evaluation = evaluate(self.sae, store.batches(EVAL_BATCH, split="eval", shuffle=False))
        lineage = {"store": {"path": str(store.path), "fingerprint": store.fingerprint, "source": store.source,
                             "n_tokens": len(store)}}
        self.sae.save(self.out_dir, extra={"train": self.cfg.to_dict(), **lineage, "metrics": evaluation.metrics,
                                           **(self.extra or {})})
        (self.out_dir / METRICS_FILE).write_text(json.dumps(
            {"final": evaluation.metrics, "tokens_per_second": tokens_per_second, "history": self.history}, indent=2))
        return TrainResult(self.sae, evaluation.metrics, evaluation, self.history, self.out_dir, tokens_per_second)


def check_pack(store: ActivationSource, members: list[tuple[SAEConfig, TrainConfig, str | Path]]) -> list[TrainConfig]:
    """The members' resolved TrainConfigs, once everything a pack needs is checked (before any run starts)."""
    if not members:
        raise SAERegistryError("a pack needs at least one configuration")
    resolved = [cfg.resolved(sae_cfg) for sae_cfg, cfg, _ in members]
    for name in PACK_SHARED:
        values = {getattr(cfg, name) for cfg in resolved}
        if len(values) > 1:
            raise SAERegistryError(f"packed configurations must share {name}; got {sorted(map(str, values))}")
    for sae_cfg, _, out in members:
        if sae_cfg.input_size != store.d:
            raise SAERegistryError(f"the SAE's input_size ({sae_cfg.input_size}) differs from the store's d ({store.d})")
        if Path(out).exists() and not Path(out).is_dir():
            raise SAERegistryError(f"{out} is a file; give --out a directory (new, or this dictionary's own)")
    lo, hi = store.split_range("train")
    n_train = hi - lo
    if n_train < resolved[0].batch_size:
        raise SAERegistryError(
            f"the store's training split has {n_train} tokens, fewer than one batch ({resolved[0].batch_size}); "
            "harvest more or lower --batch-size"
        )
    return resolved


def train_pack(
    store: ActivationSource,
    members: list[tuple[SAEConfig, TrainConfig, str | Path]],
    *,
    resume: bool = False,
    callbacks: list[Callback | None] | None = None,
    progress: bool = True,
    extras: list[dict | None] | None = None,
) -> list[TrainResult]:
    """Train several dictionaries on one stream of batches: the data is read and shuffled once.

    ``members`` are ``(sae_cfg, train_cfg, out_dir)``; they must agree on :data:`PACK_SHARED` and may
    differ in everything else (shape, k, sparsity, lr, l1_coeff, ...). Each is saved, checkpointed
    and reported exactly as :func:`train` does for one.
    """
    resolved = check_pack(store, members)
    callbacks = callbacks or [None] * len(members)
    extras = extras or [None] * len(members)
    with threads_fit_to_cpus(), writing_to([Path(out) for _, _, out in members]):
        return _train_pack(store, members, resolved, resume, callbacks, progress, extras)


def _train_pack(store: ActivationSource, members: list, resolved: list[TrainConfig], resume: bool,
                callbacks: list, progress: bool, extras: list) -> list[TrainResult]:
    """The pack's step loop (see :func:`train_pack`), its configurations already checked."""
    cfg = resolved[0]
    lo, hi = store.split_range("train")
    n_train = hi - lo
    pack = [_Member(store, sae_cfg, rcfg, Path(out), cb, ex)
            for (sae_cfg, _, out), rcfg, cb, ex in zip(members, resolved, callbacks, extras)]
    batches = store.batches(min(n_train, 16_384), seed=cfg.seed)
    sample = next(batches)
    batches.close()
    for m in pack:
        m.init_b_dec(sample)
        if resume and m.checkpoint_path.exists():
            m.resume()

    total_steps = cfg.tokens // cfg.batch_size
    steps_per_epoch = n_train // cfg.batch_size
    # A crash between two members' checkpoints leaves them at different steps: replay from the
    # earliest; members that already did a step skip it (the data order is fixed by the seed).
    step = min(m.step for m in pack)
    start_steps = [m.step for m in pack]
    eval_lo, eval_hi = store.split_range("eval")
    x_eval = store.read(eval_lo, min(eval_hi, eval_lo + cfg.eval_tokens))  # the held-out split's head
    device = torch.device(cfg.device)
    bar = tqdm(total=total_steps, initial=step, unit="step", desc="train", disable=not progress)
    started = time.perf_counter()
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        batches = store.batches(cfg.batch_size, seed=cfg.seed + 1 + epoch, drop_last=True)
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            if step >= total_steps:
                break
            batch = batch.to(device, non_blocking=True)
            for m in pack:
                if m.step == step:
                    m.train_step(batch, total_steps)
            step += 1
            bar.update(1)
            evaluating = step % cfg.eval_every == 0 or step == total_steps
            checkpointing = step % cfg.checkpoint_every == 0 or step == total_steps
            if evaluating:
                elapsed = time.perf_counter() - started
                entries = [m.evaluate_and_report(x_eval, elapsed, s0, checkpointing)
                           for m, s0 in zip(pack, start_steps)
                           if not m.history or m.history[-1]["step"] < step]  # not reported before a crash
                best = min(entries or [pack[0].history[-1]], key=lambda e: e["eval/fvu"])
                bar.set_postfix(fvu=f"{best['eval/fvu']:.3f}", l0=f"{best['eval/l0']:.1f}",
                                dead=f"{best['eval/dead_fraction']:.2f}")
            elif checkpointing:
                for m in pack:
                    m.checkpoint()
        batches.close()
    bar.close()
    elapsed = time.perf_counter() - started
    return [m.finish(store, (m.step - s0) * cfg.batch_size / max(elapsed, 1e-9)) for m, s0 in zip(pack, start_steps)]


def train(
    store: ActivationSource,
    sae_cfg: SAEConfig,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    callback: Callback | None = None,
    progress: bool = True,
    extra: dict | None = None,
) -> TrainResult:
    """Train one dictionary on ``store`` and save it to ``out_dir`` (``sae.safetensors`` + ``config.json``).

    With ``resume``, a checkpoint in ``out_dir`` is continued from its step (same data order, same
    optimiser state), provided it was made for the same store and configs. ``callback(step,
    metrics, checkpoint_dir)`` runs after every evaluation (``checkpoint_dir`` is set when a
    checkpoint was just written); an exception from it stops training (the last checkpoint stays).
    ``extra`` is added to the saved ``config.json`` (e.g. lineage).
    """
    return train_pack(store, [(sae_cfg, cfg, out_dir)], resume=resume, callbacks=[callback], progress=progress,
                      extras=[extra])[0]
