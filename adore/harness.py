"""Any lm-evaluation-harness task under a bounded KV cache: the `adore` model of lm-eval (PyPI `lm-eval`).

    python -m adore.harness --model adore --model_args pretrained=packaged:smollm2,method=adore_trained,m=256 \\
        --tasks hellaswag --batch_size 8

lm-eval's own `lm_eval` command cannot find a model defined outside its package (it has no plugin hook), so
`python -m adore.harness` registers `adore` and then runs lm-eval's command line with the same arguments. From
Python: `import adore.harness` registers it too, or pass the object itself, `lm_eval.simple_evaluate(
model=AdoreLM(...), tasks=[...])`. Every request runs the engine's loop under the method's budget, exactly as
`adore.Pipeline` (which builds the model, tokenizer and method here) and `eval.py` run it:

- `loglikelihood` (multiple choice, ...): the context is prefilled, then the continuation is teacher-forced one
  `Session.feed` per token (`adore.engine.generate.teacher_force`, the loop of `task=perplexity`'s forced NLL);
- `loglikelihood_rolling` (perplexity tasks): the same over lm-eval's rolling windows of `max_length` tokens;
- `generate_until`: the prompt is prefilled, then `adore.engine.generate.decode_steps` (the loop of `generate`) runs
  until every row has met an `until` string, its end-of-sequence token or `max_gen_toks`.

Options (`--model_args key=value,...`): those of `AdoreLM`. See docs/harness.md. lm-eval is imported only here.
"""

from __future__ import annotations

import json
import logging
import sys

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from adore.api import Pipeline
from adore.checks import check_integer
from adore.engine.generate import Sampling, decode_steps, left_pad, prefill, teacher_force
from adore.engine.session import Session
from adore.engine.text import batches_by_length
from adore.models import ModelSpec

log = logging.getLogger(__name__)

NAME = "adore"  # --model adore
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "seed")  # the gen_kwargs `Sampling` reads


class AdoreLM(TemplateLM):
    """An lm-eval model: a causal LM whose every request runs under a release method's KV budget.

    Parameters
    ----------
    pretrained : str or adore.Pipeline
        "packaged:smollm2" (the offline SmolLM2-135M-Instruct), a hub id or a local folder; or a `Pipeline`
        already built (then `method`, `m`, the model options and the method options must not be given).
    method : str
        The name of any conf/method/*.yaml (full, window, streaming, h2o, snapkv, adore, adore_trained, ...).
    m : int or None
        The KV budget of a bounded method (tokens kept per sequence); None: the configs' default (128).
    tokenizer : str or None
        A tokenizer other than the model's own (hub id or folder).
    device, dtype, adapter, gguf_file, trust_remote_code :
        As `adore.models.ModelSpec`. device None: "cuda" when CUDA is available, else "cpu" (lm-eval's command
        line passes its --device, cuda:0 unless given).
    batch_size : int, str or None
        Requests run together (similar lengths share a batch); None: 8. lm-eval's command line passes 1 unless
        `--batch_size` is given; its "auto" is not supported.
    prefill_chunk : int or None
        Feed prompts in chunks of this many tokens, releasing to m between chunks (None: the engine's default,
        the whole prompt unless it exceeds 16 m and 2,048 tokens, `adore.engine.generate.prefill_chunk_for`).
    max_length : int or None
        Longest sequence fed (prompt + generated or scored tokens); longer prompts keep their last tokens, as
        lm-eval's `hf` model does. None: the model's `max_position_embeddings`.
    max_gen_toks : int
        Tokens generated when a task's `generation_kwargs` do not say (lm-eval's default, 256).
    max_batch_size : ignored
        lm-eval passes it to every model; it only matters with batch_size=auto.
    **method_options
        Overrides of the method's config, e.g. `R=8`, `rebuild=recall`, `sinks=4`.
    """

    def __init__(
        self,
        pretrained: str | Pipeline = "packaged:smollm2",
        method: str | None = None,
        m: int | None = None,
        *,
        tokenizer: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        adapter: str | None = None,
        gguf_file: str | None = None,
        trust_remote_code: bool = False,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        prefill_chunk: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        **method_options,
    ):
        super().__init__()
        batch_size = _batch_size(batch_size)
        if max_length is not None:  # None: the model's max_position_embeddings
            check_integer("max_length", max_length, fix=": pass e.g. max_length=4096, or leave it unset")
        check_integer("max_gen_toks", max_gen_toks, fix=": pass e.g. max_gen_toks=256")
        if isinstance(pretrained, Pipeline):
            options = {"method": method, "m": m, "tokenizer": tokenizer, "prefill_chunk": prefill_chunk}
            given = [k for k, v in options.items() if v is not None] + list(method_options)
            if given:
                raise ValueError(f"AdoreLM(pretrained=<Pipeline>) got {given}: set them on the Pipeline instead")
            self.pipe = pretrained
        else:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            if device.startswith("cuda") and not torch.cuda.is_available():
                raise ValueError(
                    f"device={device!r} (lm-eval's default --device is cuda:0) but CUDA is not available here: pass --device cpu"
                )
            spec = ModelSpec(
                name_or_path=pretrained,
                gguf_file=gguf_file,
                dtype=dtype,
                device=device,
                adapter=adapter,
                trust_remote_code=trust_remote_code,
            )
            self.pipe = Pipeline(
                spec,
                tokenizer,
                method or "full",
                m=m,
                batch_size=batch_size or 8,
                prefill_chunk=prefill_chunk,
                **method_options,
            )
        self.model, self.tokenizer, self.method = self.pipe.model, self.pipe.tokenizer, self.pipe.method
        self._device = self.model.device
        self._max_length = max_length or getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_gen_toks = max_gen_toks
        self._batch_size = batch_size or self.pipe.batch_size  # lm-eval's --batch_size (1 unless given)
        self.peak_kv_bytes = 0

    # ---- what lm-eval reads --------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The context of a request with an empty one (and of rolling windows): BOS, else EOS (as lm-eval's hf)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids; the tokenizer's special tokens unless the text already starts with BOS (a chat template)."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def get_model_info(self) -> dict:
        """Written into lm-eval's results["config"]: which method, which budget, and the KV memory it used."""
        return {
            "adore_method": repr(self.method),
            "adore_m": self.method.m,
            "adore_peak_kv_bytes": self.peak_kv_bytes,
            "model_name_or_path": self.model.config.name_or_path,
        }

    # ---- the three request types ---------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation) per request
        ((cache key, context ids, continuation ids)), one `feed` per continuation token under the budget."""
        contexts, targets = [], []
        for _, ctx, cont in requests:
            keep = (ctx + cont)[-(self.max_length + 1) :]  # the last token is scored, never fed
            n = min(len(cont), self.max_length)
            contexts.append(keep[: len(keep) - n])
            targets.append(keep[len(keep) - n :])
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)  # an empty continuation: log 1
        scored = [i for i, t in enumerate(targets) if t]
        batches = batches_by_length([len(contexts[i]) + len(targets[i]) for i in scored], self.batch_size)
        for rows in tqdm(batches, desc=f"loglikelihood {self.method.tag}", disable=disable_tqdm, leave=False):
            idx = [scored[r] for r in rows]
            logp, greedy = self._forced([contexts[i] for i in idx], [targets[i] for i in idx])
            for row, i in enumerate(idx):
                results[i] = (logp[row], greedy[row])
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def _forced(self, contexts: list[list[int]], targets: list[list[int]]) -> tuple[list[float], list[bool]]:
        """Summed log-probability of each row's targets and whether each target was the argmax: the step of
        `adore.engine.generate.forced_nll` (the same log-softmax, so the same numbers) plus the greedy check."""
        B = len(contexts)
        logp_sum = torch.zeros(B, dtype=torch.float64, device=self.model.device)
        greedy = torch.ones(B, dtype=torch.bool, device=self.model.device)

        def step(t, logits, ids, valid):
            logp = logits.float().log_softmax(-1)
            target = ids[:, t]
            logp_sum.add_(torch.where(valid[:, t], logp.gather(1, target[:, None])[:, 0], 0).double())
            greedy.logical_and_((logp.argmax(-1) == target) | ~valid[:, t])

        stats = teacher_force(
            self.model, self.method, contexts, targets, self.pipe.pad_token_id, step, self.pipe.prefill_chunk
        )
        self.peak_kv_bytes = max(self.peak_kv_bytes, stats["peak_kv_bytes"])
        return logp_sum.tolist(), greedy.tolist()

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in lm-eval's disjoint rolling windows of `max_length` tokens, each
        conditioned on the prefix token (BOS) or the window's overlap, as lm-eval's hf model scores it."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            # the prefix token is the text's BOS: the text itself is encoded without special tokens
            ids = self.tok_encode(text, add_special_tokens=False)
            for ctx, cont in map(
                make_disjoint_window, get_rolling_token_windows(ids, self.prefix_token_id, self.max_length, 1)
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuation of each context, cut at the first of its `until` strings."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        bar = tqdm(total=len(requests), desc=f"generate_until {self.method.tag}", disable=disable_tqdm, leave=False)
        for idx in groups.values():
            gen_kwargs = requests[idx[0]].args[1]
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            sampling = _sampling(kwargs)
            if max_gen_toks >= self.max_length:
                raise ValueError(
                    f"max_gen_toks={max_gen_toks} leaves no room for a prompt in max_length={self.max_length}"
                )
            room = self.max_length - max_gen_toks
            prompts = [self.tok_encode(requests[i].args[0])[-room:] or [self.prefix_token_id] for i in idx]
            for rows in batches_by_length([len(p) for p in prompts], self.batch_size):
                texts = self._generate([prompts[r] for r in rows], max_gen_toks, until, eos_text, sampling)
                for r, text in zip(rows, texts):
                    i = idx[r]
                    out[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(rows))
        bar.close()
        return out

    @torch.no_grad()
    def _generate(
        self, prompts: list[list[int]], max_gen_toks: int, until: list[str], eos_text: str, sampling: Sampling
    ) -> list[str]:
        """The text generated for each prompt: `adore.engine.generate.generate`'s prefill and `decode_steps`, read one
        step at a time so that the batch stops once every row has met a stop string (or its eos)."""
        input_ids, mask = left_pad(prompts, self.pipe.pad_token_id)
        session = Session(self.model, self.method, len(prompts), input_ids.shape[1] + max_gen_toks)
        logits = prefill(session, input_ids, mask.bool(), self.pipe.prefill_chunk)
        steps = decode_steps(session, logits, max_gen_toks, self.pipe.eos_token_ids, self.pipe.pad_token_id, sampling)
        stops = [s for s in until if s and s != eos_text]  # eos itself ends a row in decode_steps
        tokens: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        eos = set(self.pipe.eos_token_ids)
        for nxt, going in steps:
            for row, (token, live) in enumerate(zip(nxt.tolist(), going.tolist())):
                if live and not done[row]:
                    tokens[row].append(token)
                    done[row] = token in eos or any(s in self._text(tokens[row]) for s in stops)
            if all(done):
                break
        self.peak_kv_bytes = max(self.peak_kv_bytes, session.peak_kv_bytes)
        return [self._text(t) for t in tokens]

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _batch_size(value) -> int | None:
    """lm-eval passes --batch_size as an int or a string ("8", "auto", "auto:4")."""
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    check_integer("batch_size", value, fix=": pass e.g. --batch_size 8 (lm-eval's 'auto' is not supported here)")
    return value


def _sampling(kwargs: dict) -> Sampling:
    """The engine's `Sampling` from lm-eval's normalised gen_kwargs (greedy unless do_sample); other keys
    (num_beams, repetition_penalty, ...) are not run by the engine, and are named in a warning."""
    ignored = sorted(set(kwargs) - set(SAMPLING_KEYS))
    if ignored:
        log.warning("adore: generation_kwargs %s are not supported by the engine and are ignored", ignored)
    if not kwargs.get("do_sample"):
        return Sampling()
    return Sampling(
        do_sample=True,
        temperature=float(kwargs.get("temperature") or 1.0),
        top_k=int(kwargs.get("top_k") or 0),
        top_p=float(kwargs.get("top_p") or 1.0),
        seed=int(kwargs.get("seed") or 0),
    )


def register() -> None:
    """Make `--model adore` known to lm-eval (a lazy entry, so running this file as __main__ registers no
    second copy of the class)."""
    import lm_eval.models  # noqa: F401  lm-eval's own names first: it fills only an empty registry by itself
    from lm_eval.api.registry import model_registry

    if NAME not in model_registry:
        model_registry.register(NAME, target=f"{__spec__.name}:AdoreLM")


register()


def main() -> None:
    """`python -m adore.harness <lm-eval arguments>`: lm-eval's command line, with `--model adore` known."""
    from lm_eval.__main__ import cli_evaluate

    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(__doc__)
    cli_evaluate()


if __name__ == "__main__":
    main()
