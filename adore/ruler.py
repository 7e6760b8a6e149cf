"""RULER-style synthetic long-context examples, generated offline and deterministically (pure Python).

RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?",
arXiv 2404.06654) measures whether a model can still use what it read thousands of tokens back. Its tasks, as
built here (prompt wording after RULER's templates; the generator is this project's own):

- `niah_single`: one needle "One of the special magic numbers for <key> is: <value>." in a haystack; the question
  asks for the key's number.
- `niah_multikey`: the same, with 3 distractor needles of other keys in the haystack.
- `niah_multivalue`: 4 needles of one key with 4 values; all 4 are asked for (partial credit).
- `niah_multiquery`: needles of 4 keys; the 4 keys are asked for at once (partial credit).
- `vt` (variable tracking, multi-hop): a chain "VAR A = 12345", "VAR B = VAR A", ... (4 hops) hidden in the
  haystack; every variable that holds the value is asked for.
- `cwe` (common words): a numbered list where 10 words appear often and many others rarely; the 10 are asked for.
- `fwe` (frequent words): coded words with Zipf frequencies (alpha 2); the 3 most frequent are asked for.

The haystack is a list of sentences (`haystack_sentences`): RULER's noise passage ("The grass is green. ...",
`NOISE`) repeated, or essay-like text (WikiText-2 articles, read offline). A needle is inserted between two
sentences at a depth: 0 puts it before the first sentence of the context, 1 after the last. cwe and fwe have no
haystack and no depth. Differences from RULER: no in-context example before vt / cwe, cwe draws pseudo-words
(offline, no word list), and the essay haystack is WikiText-2 instead of Paul Graham's essays (a download).

Lengths are counted by the caller's `count(example)` (the model's tokenizer, chat template and the tokens the
answer may take included, as RULER's `max_seq_length` counts them): `make_example` grows the haystack to the most
sentences (words for cwe / fwe) that fit. Every random draw comes from a `random.Random` seeded by the text
(seed, variant, length, index), so every method and every run sees the same prompts.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from adore.checks import is_integer

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
VARIANTS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # cycled over the examples of a (variant, length)


def check_variants_and_lengths(prefix: str, variants, lengths) -> None:
    """ValueError naming `<prefix>.variants` / `<prefix>.lengths` unless the variants are a non-empty list of
    VARIANTS and the lengths a non-empty list of positive token counts: one check for every config that asks for
    RULER examples (`task=ruler`, the labels stage's `stage.datamodule.ruler`)."""
    variants, lengths = list(variants or []), list(lengths or [])
    if not variants or any(v not in VARIANTS for v in variants):
        raise ValueError(f"{prefix}.variants={variants}: use a non-empty list of {list(VARIANTS)}")
    if not lengths or not all(is_integer(n) for n in lengths):
        raise ValueError(
            f"{prefix}.lengths={lengths} must be a non-empty list of positive token counts, e.g. [1024,2048]"
        )


NEEDLE = "One of the special magic numbers for {key} is: {value}."
NEEDLE_KEY = re.compile(re.escape(NEEDLE).replace(r"\{key\}", "(?P<key>.+?)").replace(r"\{value\}", ".+"))
NEEDLE_PARTS = ("value", "key")  # what `needle_tokens` finds in a needle
NIAH_ONE = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards.",
    "What is the special magic number for {query} mentioned in the provided text?",
    "The special magic number for {query} mentioned in the provided text is",
)
NIAH_ALL = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.",
    "What are all the special magic numbers for {query} mentioned in the provided text?",
    "The special magic numbers for {query} mentioned in the provided text are",
)
VT = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.",
    "Question: Find all variables that are assigned the value {query} in the text above.",
    "Answer: According to the chain(s) of variable assignment in the text above, {n} variables are assigned the "
    "value {query}, they are:",
)
CWE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.",
    "Question: What are the 10 most common words in the above list?",
    "Answer: The top 10 words that appear most often in the list are:",
)
FWE = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words.",
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?",
    "Answer: According to the coded text above, the three most frequently appeared words are:",
)
# needle keys are adjective-noun pairs, as RULER's
ADJECTIVES = ("ancient", "bitter", "brave", "bright", "calm", "clever", "crisp", "curious", "damp", "eager", "faint",
              "fierce", "gentle", "glossy", "golden", "hollow", "humble", "icy", "jolly", "lively", "lucky", "mellow",
              "misty", "noble", "odd", "pale", "proud", "quiet", "rapid", "rusty", "shy", "silent", "sleepy", "smooth",
              "sturdy", "swift", "tender", "vivid", "wild", "witty")  # fmt: skip
NOUNS = ("anchor", "badger", "banjo", "beacon", "blanket", "cactus", "canyon", "castle", "comet", "cradle", "dolphin",
         "engine", "falcon", "fiddle", "garden", "glacier", "harbor", "helmet", "island", "jacket", "kettle", "lantern",
         "meadow", "mirror", "needle", "orchard", "otter", "parrot", "pebble", "pillow", "quarry", "ribbon", "saddle",
         "spider", "teapot", "thimble", "tunnel", "violin", "walnut", "window")  # fmt: skip
MULTI = 4  # needles of multikey / multivalue / multiquery
HOPS = 4  # vt: variables in the chain = HOPS + 1
CWE_COMMON = 10  # cwe: words asked for
FWE_ANSWERS = 3  # fwe: words asked for
FWE_ALPHA = 2.0  # fwe: Zipf exponent of the word counts


@dataclass
class Example:
    """One prompt: `instruction`, `context` and `question` (the user's text), `answer_prefix` (the start of the
    model's answer, fed after the chat template's generation prompt), `references` (strings scored in the output)."""

    id: str
    variant: str
    length: int  # target tokens (prompt + answer budget) the example was fitted to
    index: int
    depth: float | None  # where the (first) asked-for needle sits in the context: 0 start .. 1 end; None: no needle
    instruction: str
    context: str
    question: str
    answer_prefix: str
    references: list[str]
    needles: list[str] = field(default_factory=list)  # the inserted needle sentences (the asked-for one first)
    needle_depths: list[float] = field(default_factory=list)
    units: int = 0  # haystack sentences (cwe / fwe: words) used

    def text(self) -> str:
        """The whole user message (context and question in one turn)."""
        return f"{self.instruction}\n{self.context}\n{self.question}"


def haystack_sentences(texts: list[str]) -> list[str]:
    """Sentences of haystack documents, in order. WikiText's heading lines (` = Title = `) are dropped and its
    tokenization (` @-@ `, ` @,@ `, ` @.@ `, a space before punctuation) undone, so the text reads as prose."""
    sentences = []
    for text in texts:
        lines = [ln.strip() for ln in text.splitlines()]
        prose = " ".join(ln for ln in lines if ln and not (ln.startswith("=") and ln.endswith("=")))
        prose = re.sub(r" @(.)@ ", r"\1", prose)
        prose = re.sub(r" ([.,;:!?)]|'s\b|n't\b)", r"\1", prose).replace("( ", "(")
        sentences += [s for s in re.split(r"(?<=[.!?])\s+", prose) if s.strip()]
    return sentences


def string_match_all(output: str, references: list[str]) -> float:
    """RULER's score: the share of references contained in the output, case-insensitively (1.0: all found)."""
    if not references:
        raise ValueError("an example without references cannot be scored")
    out = re.sub(r"[\x00-\x1f]", "\n", output).strip().lower()
    return sum(r.lower() in out for r in references) / len(references)


def accuracy_metrics(rows: list[dict], mean_ci: Callable[[list[float]], list[float]]) -> dict:
    """Scored examples (`variant`, `length`, `depth`, `score`) -> eval/ruler_accuracy overall, per variant, per
    length and per (variant, length), each with its interval `_ci` from `mean_ci`; eval/ruler_depth<percent>_<length>:
    the needle tasks' accuracy at one depth (the heatmap's cells); eval/ruler_needle_kept[_<variant>] and
    eval/ruler_key_kept[_<variant>]: the means of the rows' `needle_kept` and `key_kept` where measured
    (`needle_tokens`). One function for a run and for the report, which scores runs of one setting together over all
    their examples."""
    groups: dict[str, list[float]] = {"accuracy": []}
    depth_cells: dict[str, list[float]] = {}
    for r in rows:
        for key in ("accuracy", r["variant"], str(r["length"]), f"{r['variant']}_{r['length']}"):
            groups.setdefault(key, []).append(r["score"])
        if r["depth"] is not None:
            depth_cells.setdefault(f"depth{round(100 * r['depth'])}_{r['length']}", []).append(r["score"])
        for kept in ("needle_kept", "key_kept"):
            if r.get(kept) is not None:
                for key in (kept, f"{kept}_{r['variant']}"):
                    groups.setdefault(key, []).append(r[kept])
    metrics = {}
    for key, scores in groups.items():
        metrics[f"eval/ruler_{key}"] = float(np.mean(scores))
        metrics[f"eval/ruler_{key}_ci"] = mean_ci(scores)
    metrics |= {f"eval/ruler_{key}": float(np.mean(s)) for key, s in depth_cells.items()}
    return metrics


def needle_tokens(tokenizer, ids: list[int], ex: Example, part: str = "value") -> list[int] | None:
    """Indices into `ids` (the tokens of a prompt holding `ex.context`) of a part of the example's needles.
    `part="value"`: the reference strings where they stand in the needles, the tokens an answer has to copy (niah:
    the asked-for values; vt: the variables' names). `part="key"`: the keys of the needles asked for (niah: the
    words after "for"), the tokens that tell the asked needle from a distractor of the same shape.
    None where there is nothing to find (cwe, fwe; vt's keys) or the tokens cannot be told apart from their text:
    the prompt's text, decoded and encoded again, must give `ids` back, so that each token's characters are known."""
    if part not in NEEDLE_PARTS:
        raise ValueError(f"needle part {part!r}: choose one of {list(NEEDLE_PARTS)}")
    if not ex.needles:
        return None
    text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != list(ids):
        return None
    spans = []
    for needle in ex.needles:  # each needle is in the context once (needles differ in key or value)
        at = text.find(needle)
        if at < 0:
            return None
        refs = [i.span() for ref in ex.references for i in re.finditer(re.escape(ref), needle)]
        if part == "key":
            key = NEEDLE_KEY.fullmatch(needle)
            refs = [key.span("key")] if key and refs else []  # only the needles asked for
        spans += [(at + a, at + b) for a, b in refs]
    found = [
        i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > a and any(a < e and b > s for s, e in spans)
    ]
    return found or None


# ------------------------------------------------------------------------------------------------ generation


def make_example(
    variant: str,
    length: int,
    index: int,
    haystack: list[str],
    count: Callable[[Example], int],
    seed: int = 0,
    depths: tuple[float, ...] = DEPTHS,
    hint: int | None = None,
) -> Example:
    """The `index`-th example of `variant` fitted to `length` tokens: the most haystack sentences (cwe / fwe: words)
    for which `count(example) <= length`. `hint`: a size to start the search from (the previous example's)."""
    if variant not in VARIANTS:
        raise ValueError(f"task.variants: {variant!r} is not one of {list(VARIANTS)}")
    tag = f"ruler|{seed}|{variant}|{length}|{index}"
    depth = depths[index % len(depths)] if variant not in ("cwe", "fwe") else None
    build = BUILDERS[variant](random.Random(tag), haystack, depth, length, tag)

    def make(n: int) -> Example:
        ex = build(n)
        ex.id, ex.variant, ex.length, ex.index, ex.units = f"{variant}-{length}-{index}", variant, length, index, n
        return ex

    n = _largest(lambda n: count(make(n)) <= length, hint or 16)
    if n < 1:
        raise ValueError(
            f"task.lengths: {length} tokens cannot hold a {variant} example (its question and answer budget "
            f"alone take {count(make(0))}): use a longer length or fewer eval.max_new_tokens"
        )
    return make(n)


def _largest(fits: Callable[[int], bool], start: int) -> int:
    """The largest n >= 1 with fits(n), for a `fits` true up to some n and false after (0: not even fits(1)):
    doubling steps from `start`, then bisection."""
    n, step = max(start, 1), 1
    if fits(n):
        lo = n
        while fits(lo + step):
            lo, step = lo + step, step * 2
        hi = lo + step
    else:
        hi = n
        while hi - step >= 1 and not fits(hi - step):
            hi, step = hi - step, step * 2
        lo = max(hi - step, 0)  # fits(lo), or 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _place(sentences: list[str], inserts: list[tuple[float, str]]) -> str:
    """Sentences with each (depth, text) inserted between sentences: depth d goes before sentence round(d * n)."""
    n = len(sentences)
    at: dict[int, list[str]] = {}
    for d, text in inserts:
        at.setdefault(round(d * n), []).append(text)
    out = []
    for i in range(n + 1):
        out += at.get(i, [])
        if i < n:
            out.append(sentences[i])
    return " ".join(out)


def _window(haystack: list[str], start: int, n: int) -> list[str]:
    """n sentences of the haystack from `start`, wrapping around (the noise passage repeats itself)."""
    if not haystack:
        raise ValueError("the haystack has no sentences: use data=noise or data=wikitext2")
    return [haystack[(start + i) % len(haystack)] for i in range(n)]


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _keys(rng: random.Random, k: int) -> list[str]:
    return rng.sample([f"{a}-{b}" for a in ADJECTIVES for b in NOUNS], k)


def _niah(keys: int, values: int, queries: int):
    def builder(rng: random.Random, haystack: list[str], depth: float, length: int, tag: str):
        names = _keys(rng, keys)
        vals = [[_number(rng) for _ in range(values)] for _ in names]
        start = rng.randrange(len(haystack) or 1)
        asked = names[:queries]  # the first keys are asked for; the others are distractors
        needles = [NEEDLE.format(key=k, value=v) for k, vs in zip(names, vals) for v in vs]
        where = [depth] + [rng.random() for _ in needles[1:]]  # the first asked-for needle at the stated depth
        query = ", ".join(asked[:-1]) + ", and " + asked[-1] if len(asked) > 1 else asked[0]
        instruction, question, prefix = NIAH_ONE if values * queries == 1 else NIAH_ALL
        references = [v for vs in vals[:queries] for v in vs]

        def build(n: int) -> Example:
            context = _place(_window(haystack, start, n), list(zip(where, needles)))
            return Example("", "", 0, 0, depth, instruction, context, question.format(query=query),
                           prefix.format(query=query), references, needles, where)  # fmt: skip

        return build

    return builder


def _vt(rng: random.Random, haystack: list[str], depth: float, length: int, tag: str):
    names: list[str] = []
    while len(names) < HOPS + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    value = _number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    later = sorted(depth + (1 - depth) * rng.random() for _ in chain[1:])  # each hop after the one before
    where = [depth, *later]
    start = rng.randrange(len(haystack) or 1)
    instruction, question, prefix = VT

    def build(n: int) -> Example:
        context = _place(_window(haystack, start, n), list(zip(where, chain)))
        return Example("", "", 0, 0, depth, instruction, context, question.format(query=value),
                       prefix.format(query=value, n=len(names)), list(names), chain, where)  # fmt: skip

    return build


def _pseudo_words(rng: random.Random, k: int) -> list[str]:
    """k distinct pronounceable pseudo-words of 3 consonant-vowel syllables ("bamoti")."""
    words: list[str] = []
    seen = set()
    while len(words) < k:
        w = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def _cwe(rng: random.Random, haystack: list[str], depth: None, length: int, tag: str):
    # RULER: below 4k tokens the common words appear 6 times and the others once; from 4k, 30 and 3 times
    pool = _pseudo_words(rng, 4096)
    common = pool[:CWE_COMMON]
    instruction, question, prefix = CWE

    freq_common, freq_rare = (6, 1) if length < 4096 else (30, 3)

    def build(n: int) -> Example:
        rare = [pool[CWE_COMMON + i % (len(pool) - CWE_COMMON)] for i in range(n)]
        words = common * freq_common + rare * freq_rare
        random.Random(f"{tag}|{n}").shuffle(words)
        context = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return Example("", "", 0, 0, None, instruction, context, question, prefix, list(common))

    return build


def _fwe(rng: random.Random, haystack: list[str], depth: None, length: int, tag: str):
    vocab: list[str] = []
    while len(vocab) < max(length // 50, FWE_ANSWERS + 2):  # RULER: a vocabulary of max_seq_length / 50 coded words
        w = "".join(rng.choices(string.ascii_lowercase, k=6))
        if w not in vocab:
            vocab.append(w)
    vocab[0] = "..."  # the most frequent "word" is noise (RULER's dots)
    zeta = math.pi**2 / 6 if FWE_ALPHA == 2.0 else sum(k**-FWE_ALPHA for k in range(1, 100_000))
    instruction, question, prefix = FWE

    def build(n: int) -> Example:
        counts = [int(n * k**-FWE_ALPHA / zeta) for k in range(1, len(vocab) + 1)]
        words = [w for w, c in zip(vocab, counts) for _ in range(c)]
        random.Random(f"{tag}|{n}").shuffle(words)
        return Example("", "", 0, 0, None, instruction, " ".join(words), question, prefix,
                       vocab[1 : 1 + FWE_ANSWERS])  # fmt: skip

    return build


BUILDERS = {
    "niah_single": _niah(1, 1, 1),
    "niah_multikey": _niah(MULTI, 1, 1),
    "niah_multivalue": _niah(1, MULTI, 1),
    "niah_multiquery": _niah(MULTI, 1, MULTI),
    "vt": _vt,
    "cwe": _cwe,
    "fwe": _fwe,
}
