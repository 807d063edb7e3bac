"""Token IDs of the served model, for prompts of exactly the requested number of tokens.

Text of N words is N tokens only on a tokenizer the word list suits (the project's tiny one);
on any other tokenizer it is more.  Sent as token IDs, a prompt is exactly as long as asked on
every model.  The IDs are those of ordinary words (`loadgen.prompts.WORDS`), read from the
server's own `/tokenize` (vLLM's OpenAI server has it) or from a local tokenizer (`--tokenizer`),
so prompts contain no special tokens.  `prompt_pool` picks the source for a run (or text, and says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from loadgen.config import RunConfig
from loadgen.prompts import WORDS

TEXT = " " + " ".join(WORDS.tolist())


@dataclass(frozen=True, slots=True)
class TokenPool:
    """Distinct token IDs to draw prompts from, and where they came from."""

    ids: np.ndarray
    source: str

    def __post_init__(self) -> None:
        if len(self.ids) < 8:
            raise ValueError(f"{self.source}: only {len(self.ids)} distinct token IDs for the word list; "
                             "prompts need at least 8")


def _pool(ids: list[int], source: str) -> TokenPool:
    return TokenPool(np.unique(np.asarray(ids, dtype=np.int64)), source)


def from_tokenizer(name_or_path: str) -> TokenPool:
    """IDs of the word list under a Hugging Face tokenizer (a local folder or a cached hub name)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:
        raise ValueError(f"cannot load tokenizer {name_or_path!r}: {exc}") from exc
    return _pool(tok.encode(TEXT, add_special_tokens=False), f"tokenizer {name_or_path}")


async def from_server(session: Any, base_url: str, model: str) -> TokenPool:
    """IDs of the word list from the server's `/tokenize` (aiohttp `session`); ValueError if it has none."""
    url = base_url.rstrip("/") + "/tokenize"
    try:
        async with session.post(url, json={"model": model, "prompt": TEXT, "add_special_tokens": False}) as r:
            if r.status != 200:
                raise ValueError(f"{url} answered {r.status}: {(await r.text())[:200]}")
            body = await r.json()
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot read {url}: {type(exc).__name__}: {exc}") from exc
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise ValueError(f"{url} answered without a list of token IDs: {str(body)[:200]}")
    return _pool(tokens, f"{url} ({model})")


def draw(pool: TokenPool, rng: np.random.Generator, n: int) -> list[int]:
    """n token IDs drawn uniformly from the pool: prompts share no prefix."""
    return pool.ids[rng.integers(0, len(pool.ids), n)].tolist() if n > 0 else []


def repetitive_ids(pool: TokenPool, rng: np.random.Generator, n: int, period: int = 12) -> list[int]:
    """Exactly n IDs: a `period`-token line repeated (its n-grams recur, so n-gram drafts are accepted)."""
    line = draw(pool, rng, period)
    reps = -(-n // period)
    return (line * reps)[:n]


TEXT_SOURCE = "text (≈ 1 token per word; the server's usage is the truth)"


async def prompt_pool(config: RunConfig, session: Any) -> tuple[TokenPool | None, str]:
    """Where synthetic prompts' tokens come from, and how the results name it: the served model's own
    token IDs (exact lengths) unless the endpoint, the data set or `prompt_format` says text."""
    if config.dataset == "sharegpt":
        return None, "data set text (lengths estimated at 4 characters per token; the server's usage is the truth)"
    if config.prompt_format == "text" or config.endpoint == "chat":
        return None, TEXT_SOURCE if config.endpoint != "chat" else TEXT_SOURCE + "; the chat template adds more"
    if config.tokenizer:
        pool = from_tokenizer(config.tokenizer)
    else:
        try:
            pool = await from_server(session, config.base_url, config.model)
        except ValueError as exc:
            if config.prompt_format == "token-ids":
                raise ValueError(f"prompt_format=token-ids: {exc}; give a tokenizer (--tokenizer)") from None
            return None, f"{TEXT_SOURCE}; no token IDs: {exc}"
    return pool, f"token IDs from {pool.source}"
