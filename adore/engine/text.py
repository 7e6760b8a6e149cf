"""Text in and out of the engine: chat prompts as token ids (a long one cut in the middle, never silently),
the ids that end a reply, and batches of similar lengths. The API, the harness and the evaluation tasks all
read prompts this way, so a prompt scores the same wherever it is fed."""

from __future__ import annotations

PROMPT_HEAD = 64  # a prompt over max_prompt_tokens keeps its first tokens (chat header, instruction) and its end


def encode_prompts(tokenizer, records, max_prompt_tokens: int | None) -> tuple[list[list[int]], list[int]]:
    """Chat-template token ids per record, and the tokens cut from each.

    A prompt over `max_prompt_tokens` keeps its first PROMPT_HEAD tokens (the chat header and the start of the
    instruction) and its last ones: the middle is cut, and the cut is recorded, never silent."""
    prompts, cut = [], []
    for r in records:
        ids = tokenizer.apply_chat_template(r["messages"], add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        over = len(ids) - max_prompt_tokens if max_prompt_tokens else 0
        if over > 0:
            head = min(PROMPT_HEAD, max_prompt_tokens // 4)
            ids = ids[:head] + ids[head + over :]
        prompts.append(ids)
        cut.append(max(over, 0))
    return prompts, cut


def eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen = model.generation_config.eos_token_id
    ids.update(gen if isinstance(gen, list) else [gen])
    return sorted(i for i in ids if i is not None)


def batches_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Example indices grouped so that similar lengths share a batch (less padding), longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
