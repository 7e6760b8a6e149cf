"""Fidelity to full attention: how far a bounded cache moves the model from what full attention does.

Reference-based scores of a 135M model are low and close together; distances to full attention separate
release policies with few examples. Two views:

* teacher-forced: full attention's greedy continuation (or the reference text) is fed through the method's
  bounded cache one token per `Session.feed`; at each position we compare the method's next-token
  distribution with full attention's: KL(full || method), top-1 agreement, rank of full's top token;
* free-running: the method's own greedy output against full attention's (first divergence, identical
  fraction, ROUGE-L / BERTScore-F between the two texts).

Full attention's outputs and distributions are computed once per setting and stored on disk
(`Reference`); every method of a sweep reuses them. Distributions are stored as full attention's top-k
log-probabilities; KL is computed over those k tokens plus one bucket for the rest of the vocabulary,
which is exact when the top-k hold all the mass and a lower bound otherwise (`fidelity/ref_tail_mass`
says how much mass was bucketed).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adore.checks import check_integer
from adore.engine.generate import teacher_force
from adore.io import read_json, save_torch, write_json

SOURCES = ("full", "reference")


@dataclass(frozen=True)
class Fidelity:
    """Config `task.fidelity`."""

    enabled: bool = True
    source: str = "full"  # full: full attention's greedy output is teacher-forced; reference: the dataset's text
    top_k: int = 256  # full attention's top-k log-probs stored per position (KL support)
    cache_dir: str = "outputs/reference"  # where full attention's outputs are stored, keyed by settings
    diagnose: bool = False  # also record the release diagnostic (adore.engine.diagnostic; one more full-attention pass)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"task.fidelity.source={self.source!r}: use one of {SOURCES}")
        check_integer("task.fidelity.top_k", self.top_k, fix=": log-probs stored per position, e.g. 256")


@dataclass
class Reference:
    """Full attention's greedy outputs and, per teacher-forced position, its top-k log-probabilities."""

    tokens: list[list[int]]  # per example: full attention's greedy output ids (eos included)
    texts: list[str]
    forced: list[list[int]]  # per example: the ids that are teacher-forced (= tokens, or the reference text)
    top_logp: list[torch.Tensor] = field(default_factory=list)  # per example: (len(forced), k) float32
    top_ids: list[torch.Tensor] = field(default_factory=list)  # per example: (len(forced), k) int64
    key: dict = field(default_factory=dict)


def reference_path(fidelity: Fidelity, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(fidelity.cache_dir) / digest


def load_reference(fidelity: Fidelity, key: dict) -> Reference | None:
    folder = reference_path(fidelity, key)
    if not (folder / "reference.pt").exists() or not (folder / "key.json").exists():
        return None
    if read_json(folder / "key.json") != json.loads(json.dumps(key, default=str)):
        return None  # a hash collision of different settings: recompute
    return Reference(**torch.load(folder / "reference.pt", weights_only=True), key=key)


def store_reference(fidelity: Fidelity, ref: Reference) -> Path:
    folder = reference_path(fidelity, ref.key)
    save_torch(folder / "reference.pt", {k: v for k, v in asdict(ref).items() if k != "key"})
    write_json(folder / "key.json", ref.key)  # last: marks the reference as complete
    return folder


def forced_logits(
    model,
    method,
    prompts: list[list[int]],
    forced: list[list[int]],
    batches: list[list[int]],
    pad_id: int,
    prefill_chunk: int | None,
    progress: bool,
    visit,
    diagnose: bool = False,
) -> dict[int, dict]:
    """Feed each prompt, then its forced tokens one `feed` at a time under `method`'s budget.

    `visit(i, j, logits)` gets example i's (vocab,) logits predicting forced[i][j], for every j. With
    `diagnose`, returns example i's release diagnostic (`adore.engine.diagnostic`) by i.
    """
    diagnostic = {}
    for batch in tqdm(batches, desc=f"teacher-force {method.tag}", disable=not progress, leave=False):
        stats = teacher_force(
            model,
            method,
            [prompts[i] for i in batch],
            [forced[i] for i in batch],
            pad_id,
            partial(_visit_rows, batch, visit),
            prefill_chunk,
            diagnose=diagnose,
        )
        diagnostic |= dict(zip(batch, stats.get("diagnostic", [])))
    return diagnostic


def _visit_rows(batch: list[int], visit, j: int, logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> None:
    """`teacher_force`'s step: hand each row's logits that predict a real (not padding) token to `visit`."""
    for row, (i, ok) in enumerate(zip(batch, valid[:, j].tolist())):
        if ok:
            visit(i, j, logits[row].float())


def build_reference(
    model,
    full_method,
    prompts,
    forced,
    tokens,
    texts,
    batches,
    pad_id,
    fidelity: Fidelity,
    prefill_chunk,
    progress,
    key,
) -> Reference:
    """Teacher-force `forced` through full attention and keep its top-k log-probs per position."""
    top_logp = [torch.zeros(len(f), min(fidelity.top_k, model.config.vocab_size)) for f in forced]
    top_ids = [torch.zeros(len(f), min(fidelity.top_k, model.config.vocab_size), dtype=torch.long) for f in forced]

    def visit(i, j, logits):
        top = logits.log_softmax(-1).topk(top_logp[i].shape[1])
        top_logp[i][j], top_ids[i][j] = top.values.cpu(), top.indices.cpu()

    forced_logits(model, full_method, prompts, forced, batches, pad_id, prefill_chunk, progress, visit)
    return Reference(tokens=tokens, texts=texts, forced=forced, top_logp=top_logp, top_ids=top_ids, key=key)


def divergence(
    ref: Reference, model, method, prompts, batches, pad_id, prefill_chunk, progress, diagnose: bool = False
) -> dict[str, list[float]]:
    """Per-example teacher-forced KL(full || method), top-1 agreement and rank of full's top token; with
    `diagnose` (a bounded method), the release diagnostic as `release_<key>` (adore.engine.diagnostic)."""
    sums = {k: [0.0] * len(prompts) for k in ("kl", "top1", "rank", "tail")}

    def visit(i, j, logits):
        logq = logits.log_softmax(-1)
        logp, idx = ref.top_logp[i][j].to(logq.device), ref.top_ids[i][j].to(logq.device)
        kl, p_tail = kl_top_k(logp, idx, logq)
        best = idx[0]
        sums["kl"][i] += kl
        sums["top1"][i] += float(logq.argmax() == best)
        sums["rank"][i] += float((logq > logq[best]).sum()) + 1
        sums["tail"][i] += float(p_tail)

    diagnostic = forced_logits(
        model, method, prompts, ref.forced, batches, pad_id, prefill_chunk, progress, visit, diagnose
    )
    counts = [max(len(f), 1) for f in ref.forced]
    scores = {k: [s / c for s, c in zip(v, counts)] for k, v in sums.items()}
    if diagnostic:
        from adore.engine.diagnostic import REPORTED

        # an example whose history never exceeded m has no counted step: None, left out of the means
        for key in REPORTED:
            scores[f"release_{key}"] = [diagnostic[i].get(key) for i in range(len(prompts))]
    return scores


def kl_top_k(logp: torch.Tensor, idx: torch.Tensor, logq: torch.Tensor) -> tuple[float, float]:
    """KL(p || q) over p's top-k tokens plus one bucket for the rest; returns (KL, p's bucketed mass).

    logp, idx: (k,) log-probs of full attention's top-k tokens and their ids; logq: (vocab,) method log-probs.
    """
    p = logp.exp()
    p_tail = (1 - p.sum()).clamp(min=0)
    q_top = logq[idx]
    kl = (p * (logp - q_top)).sum()
    if p_tail > 1e-9:
        q_tail = (1 - q_top.exp().sum()).clamp(min=1e-12)
        kl = kl + p_tail * (p_tail.log() - q_tail.log())
    return float(kl.clamp(min=0)), float(p_tail)


def first_divergence(ours: list[int], theirs: list[int]) -> int:
    """Tokens generated before the first difference (the whole length when identical)."""
    for j, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return j
    return min(len(ours), len(theirs))
