"""ADORE inside your own code: any Hugging Face causal LM, a release method, then generate / stream / score.

```python
from adore import Pipeline

pipe = Pipeline("packaged:smollm2", method="streaming", m=64)  # or Pipeline(model, tokenizer, method=H2O(m=64))
text = pipe.generate("Summarise: ...", max_new_tokens=64)
for piece in pipe.stream([{"role": "user", "content": "Hi"}], max_new_tokens=64):
    print(piece, end="")
ppl = pipe.score("some long text")
```

Everything runs the engine's one loop (`adore.engine.session.Session.feed`) exactly as `eval.py` does: prompts are
prefilled, then every new (or scored) token is one `feed`, after which the method releases down to `m`
cached tokens. A method by name is built from `conf/method/<name>.yaml` as `eval.py method=<name>` builds it.
Plain PyTorch and transformers: no Lightning, and Hydra only to read a method's config. See docs/api.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import fields

import torch

from adore.checks import check_integer
from adore.engine.generate import Sampling, decode_steps, forced_nll, generate, left_pad, prefill
from adore.engine.session import Session
from adore.engine.text import batches_by_length, encode_prompts, eos_ids
from adore.methods import Method
from adore.models import ModelSpec, load_model, load_tokenizer

Prompt = str | list[dict]  # a text, or chat messages [{"role": "user", "content": "..."}, ...]


class Pipeline:
    """A causal LM and a release method, ready to generate, stream and score under the method's KV budget.

    Parameters
    ----------
    model : str, ModelSpec or PreTrainedModel
        "packaged:smollm2" (offline), a hub id or a local folder, loaded with `adore.models.load`; or a model
        you loaded yourself (then pass its `tokenizer` too). The engine switches the model's attention
        implementation to its own ("adore": SDPA over the cache's slot mask), which behaves as SDPA elsewhere.
    tokenizer : str, PreTrainedTokenizer or None
        None: the model's own (when `model` is a name). It is not modified.
    method : str or adore.methods.Method
        The name of any conf/method/*.yaml (`adore.registry.method_names()`) or a method object, e.g.
        `adore.methods.H2O(m=64)`.
    m : int or None
        The KV budget (tokens kept per sequence) of a method given by name; None: the configs' default (128).
    device, dtype : str
        Where and in which precision to load a model given by name ("cpu", "cuda"; "float32", "bfloat16", ...).
    batch_size : int
        Prompts or texts run together by `generate` and `score` (similar lengths share a batch).
    prefill_chunk : int or None
        Feed prompts in chunks of this many tokens, releasing to `m` between chunks (None: whole prompt).
    max_prompt_tokens : int or None
        Longer prompts lose their middle: a chat prompt keeps its first `adore.eval.tasks.PROMPT_HEAD` (64) tokens (the
        chat header and the start of the instruction, at most a quarter of the limit) and its last ones, as
        `eval.py` cuts them; a plain text without a chat template keeps its last tokens.
    chat_template : bool or None
        Whether a text prompt is wrapped as one user message of the tokenizer's chat template (None: when the
        tokenizer has one). Chat messages always use the template.
    **method_options
        Overrides of a method given by name, e.g. `R=8` for ADORE or `sinks=2` for StreamingLLM.
    """

    def __init__(
        self,
        model="packaged:smollm2",
        tokenizer=None,
        method: str | Method = "full",
        *,
        m: int | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 8,
        prefill_chunk: int | None = None,
        max_prompt_tokens: int | None = None,
        chat_template: bool | None = None,
        **method_options,
    ):
        check_integer("batch_size", batch_size, fix=": pass e.g. batch_size=8")
        for key, value in (("prefill_chunk", prefill_chunk), ("max_prompt_tokens", max_prompt_tokens)):
            if value is not None:
                check_integer(key, value, fix=f": pass e.g. {key}=512, or None")
        self.method = _build_method(method, m, method_options)  # before loading anything: bad names fail fast
        if isinstance(model, str | ModelSpec):
            spec = model if isinstance(model, ModelSpec) else ModelSpec(name_or_path=model, device=device, dtype=dtype)
            self.model = load_model(spec)
            tokenizer = load_tokenizer(spec) if tokenizer is None else tokenizer
        elif isinstance(model, torch.nn.Module) and hasattr(model, "config"):
            if tokenizer is None:
                raise ValueError("Pipeline(model, tokenizer=None): pass the tokenizer of an already loaded model")
            self.model = model
        else:
            raise ValueError(
                f"model={type(model).__name__}: pass a hub id, a folder or 'packaged:smollm2', "
                "an adore.models.ModelSpec, or a loaded transformers causal LM with its tokenizer"
            )
        self.tokenizer = load_tokenizer(ModelSpec(name_or_path=tokenizer)) if isinstance(tokenizer, str) else tokenizer
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise ValueError("chat_template=True but the tokenizer has no chat template: use chat_template=None")
        self.chat_template = has_template if chat_template is None else chat_template
        self.batch_size, self.prefill_chunk, self.max_prompt_tokens = batch_size, prefill_chunk, max_prompt_tokens
        self.eos_token_ids = eos_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids or [0])[0]  # padding is masked anyway

    def __repr__(self) -> str:
        return f"Pipeline(model={self.model.config.name_or_path!r}, method={self.method!r})"

    # ---- the three uses ----------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt], max_new_tokens: int = 64, **sampling) -> str | list[str]:
        """The reply to a prompt (a str), or to each prompt of a list (a list of str, in order).

        A prompt is a text or chat messages; generation stops at the model's end-of-sequence token or after
        `max_new_tokens`; special tokens are left out of the text. `sampling`: fields of
        `adore.engine.generate.Sampling` (`do_sample`, `temperature`, `top_k`, `top_p`, `seed`); greedy by default.
        """
        batch, single = self._prompts(prompts)
        check_integer("max_new_tokens", max_new_tokens, fix=": pass e.g. max_new_tokens=64")
        sampling = _sampling(sampling)
        ids = self._encode(batch)
        texts: list[str] = [""] * len(ids)
        for rows in batches_by_length([len(x) for x in ids], self.batch_size):
            input_ids, mask = left_pad([ids[i] for i in rows], self.pad_token_id)
            gen = generate(
                self.model,
                self.method,
                input_ids,
                mask,
                max_new_tokens,
                self.eos_token_ids,
                self.pad_token_id,
                sampling,
                self.prefill_chunk,
            )
            for row, i in enumerate(rows):
                texts[i] = self._text(gen.tokens[row, : gen.lengths[row]].tolist())
        return texts[0] if single else texts

    def stream(self, prompt: Prompt, max_new_tokens: int = 64, **sampling) -> Iterator[str]:
        """Yield the reply to one prompt in pieces of text as its tokens are generated.

        The pieces join to `generate`'s text for the same arguments (sampling included): the loop is
        `generate`'s (`adore.engine.generate.decode_steps`), read one step at a time. A piece is held back while the
        text so far ends in an incomplete character. Leaving the loop early stops the generation.
        """
        batch, single = self._prompts(prompt)
        if not single:
            raise ValueError(f"stream takes one prompt, got a list of {len(batch)}: use generate for a batch")
        check_integer("max_new_tokens", max_new_tokens, fix=": pass e.g. max_new_tokens=64")
        ids = self._encode(batch)[0]
        input_ids, mask = left_pad([ids], self.pad_token_id)
        session = Session(self.model, self.method, 1, len(ids) + max_new_tokens)
        logits = prefill(session, input_ids, mask.bool(), self.prefill_chunk)
        steps = decode_steps(
            session, logits, max_new_tokens, self.eos_token_ids, self.pad_token_id, _sampling(sampling)
        )
        out: list[int] = []
        sent = ""
        for nxt, _ in steps:
            out.append(int(nxt[0]))
            text = self._text(out)
            if text.startswith(sent) and not text.endswith("\ufffd"):
                piece, sent = text[len(sent) :], text
                if piece:
                    yield piece
        text = self._text(out)
        if len(text) > len(sent):
            yield text[len(sent) :]

    def score(self, texts: str | Sequence[str], prompt: Prompt | Sequence[Prompt] | None = None) -> float | list[float]:
        """Perplexity of a text (a float) or of each text of a list, one `feed` per token under the budget.

        Without `prompt`, the text's first token (a BOS when the tokenizer adds one) is context and every
        later token is scored, as `task=perplexity` reads a document. With `prompt` (one, or one per text),
        the prompt is prefilled as for `generate` and the text is scored as its reply.
        """
        if isinstance(texts, str):
            batch, single = [texts], True
        elif isinstance(texts, Sequence) and texts and all(isinstance(t, str) for t in texts):
            batch, single = list(texts), False
        else:
            raise ValueError(f"texts={_short(texts)}: pass a str or a non-empty list of str")
        if prompt is None:
            ids = [self.tokenizer(t)["input_ids"] for t in batch]
            contexts, targets = [x[:1] for x in ids], [x[1:] for x in ids]
        else:
            prompts, one = self._prompts(prompt)
            if one:
                prompts = prompts * len(batch)
            if len(prompts) != len(batch):
                raise ValueError(
                    f"score got {len(batch)} texts and {len(prompts)} prompts: pass one prompt, or one per text"
                )
            contexts = self._encode(prompts)
            targets = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in batch]
        for text, target in zip(batch, targets):
            if not target:
                raise ValueError(f"text {_short(text)} has no token to score: pass a longer text")
        ppl: list[float] = [0.0] * len(batch)
        for rows in batches_by_length([len(c) + len(t) for c, t in zip(contexts, targets)], self.batch_size):
            nll, counts, _ = forced_nll(
                self.model,
                self.method,
                [contexts[i] for i in rows],
                [targets[i] for i in rows],
                self.pad_token_id,
                prefill_chunk=self.prefill_chunk,
            )
            for row, i in enumerate(rows):
                ppl[i] = math.exp(nll[row] / counts[row])
        return ppl[0] if single else ppl

    # ---- helpers -----------------------------------------------------------------------------------------
    def _prompts(self, prompts) -> tuple[list[Prompt], bool]:
        """(prompts, whether one was given): a str or a list of messages is one prompt, a list of those a batch."""
        if isinstance(prompts, str) or _is_messages(prompts):
            return [prompts], True
        if isinstance(prompts, Sequence) and prompts and all(isinstance(p, str) or _is_messages(p) for p in prompts):
            return list(prompts), False
        raise ValueError(
            f"prompt={_short(prompts)}: pass a str, chat messages [{{'role': 'user', 'content': '...'}}], "
            "or a non-empty list of those"
        )

    def _encode(self, prompts: list[Prompt]) -> list[list[int]]:
        """Token ids per prompt: messages (and, with a chat template, texts) through the template."""
        if not self.chat_template and any(not isinstance(p, str) for p in prompts):
            raise ValueError("chat messages need a tokenizer with a chat template: pass the prompt as a str")
        ids = []
        for p in prompts:
            if self.chat_template:
                messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
                ids += encode_prompts(self.tokenizer, [{"messages": messages}], self.max_prompt_tokens)[0]
            else:
                x = self.tokenizer(p)["input_ids"]
                ids.append(x[-self.max_prompt_tokens :] if self.max_prompt_tokens else x)
            if not ids[-1]:
                raise ValueError(f"prompt {_short(p)} has no tokens: pass a non-empty prompt")
        return ids

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _build_method(method, m: int | None, options: dict) -> Method:
    if isinstance(method, Method):
        if m is not None or options:
            given = ", ".join([f"m={m}"] * (m is not None) + [f"{k}={v!r}" for k, v in options.items()])
            raise ValueError(f"{given} set a method given by name; set them on the method object ({method!r}) instead")
        return method
    from adore.config import build
    from adore.registry import method_config, method_names

    if not isinstance(method, str):
        raise ValueError(f"method={method!r}: pass one of {method_names()} or an adore.methods.Method object")
    budget = {} if m is None else {"budget": m}  # None: the registry's default budget
    if m is not None:
        check_integer("m", m, fix=": pass the cache budget, e.g. m=256, or None for the method's default")
    node = method_config(method, **budget)  # a ValueError listing the names if it is not one
    unknown = sorted(set(options) - set(node) - {"_target_"})
    if unknown:
        known = sorted(k for k in node if k not in ("_target_", "m"))
        raise ValueError(f"method={method!r} has no option {unknown}: its options are {known} (and m)")
    built = build(method_config(method, **budget, **options) if options else node)
    if m is not None and built.m != m:
        raise ValueError(f"method={method!r} keeps every token (no budget); drop m={m} or choose a bounded method")
    return built


def _sampling(options: dict) -> Sampling:
    names = [f.name for f in fields(Sampling)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"unknown sampling option {unknown}: use {names}")
    return Sampling(**options)


def _is_messages(x) -> bool:
    return (
        isinstance(x, Sequence)
        and not isinstance(x, str)
        and bool(x)
        and all(isinstance(msg, dict) and "role" in msg and "content" in msg for msg in x)
    )


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."
