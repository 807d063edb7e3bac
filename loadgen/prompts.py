"""Prompt text of roughly N tokens without a tokenizer.

Prompts are made of common lower-case English words, each of which is one token (with its
leading space) in the GPT-2, Llama, Mistral and Qwen BPE vocabularies, so N words ≈ N tokens.
The server's own usage figures give the true count; results report that, not this estimate.
"""

from __future__ import annotations

import math

import numpy as np

WORDS = np.array("""
the of and to in is was for on that with as it his by at from he be are this not or an but
which have had one were all they their has her been who more other can time first new after
two also into would only when there some these most made than about over many them such then
may its out up years part world used city during where three being him like state school both
well while under four life between before war people name river work through year home
family small later water since each film began early way same number group second high found
north south east west old great long place game known called large good point show team music
house power land play country book back light line field form road church party side course
""".split())
CHARS_PER_TOKEN = 4.0  # rule of thumb for English BPE: used only for text from a data set


def estimate_tokens(text: str) -> int:
    """Approximate token count of arbitrary text (≈ 4 characters per token)."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def random_words(rng: np.random.Generator, n: int) -> str:
    """n random common words: ≈ n tokens, unique enough that prompts share no prefix."""
    return " ".join(WORDS[rng.integers(0, len(WORDS), n)].tolist()) if n > 0 else ""


def shared_prefix(seed: int, group: int, n: int) -> str:
    """The common system prompt of a shared-prefix group: the same text for a given (seed, group)."""
    return random_words(np.random.default_rng([seed, group, 7919]), n)


def repetitive(rng: np.random.Generator, n: int, period: int = 12) -> str:
    """≈ n tokens of one `period`-word line repeated, after an instruction to keep repeating it:
    the continuation repeats n-grams of the prompt, so n-gram (prompt-lookup) drafts are accepted."""
    head = "repeat the following line again and again:"  # ≈ 8 tokens
    line = random_words(rng, period) + "."  # + newline: ≈ period + 2 tokens
    reps = max(1, (n - 8) // (period + 2))
    return head + "\n" + "\n".join([line] * reps)
