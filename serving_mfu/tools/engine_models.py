"""Small models the vLLM CPU engine can serve, built locally (no model hub): weights and tokenizer.

`ensure_model(name, root)` writes a Hugging Face model folder — random weights from a fixed
seed, a byte-level BPE tokenizer trained on a built-in text, a chat template — once, and
returns its path.  The shapes use head_dim 64, which the CPU attention kernels support.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from loadgen.prompts import WORDS
from serving_mfu.runtime.settings import load_settings

_COMMON: dict[str, Any] = {
    "hidden_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_hidden_layers": 2,
    "vocab_size": 2048,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

ENGINE_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-llama-engine": {
        **_COMMON,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "intermediate_size": 512,
        "hidden_act": "silu",
    },
    # the same shapes with another tokenizer: 512 tokens learnt from the corpus alone, so the load
    # generator's words are several tokens each (a server whose tokenizer the word list does not suit)
    "tiny-llama-bpe512-engine": {
        **_COMMON,
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "intermediate_size": 512,
        "hidden_act": "silu",
        "vocab_size": 512,
    },
    "tiny-qwen3-moe-engine": {
        **_COMMON,
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "hidden_act": "silu",
    },
}

# The demo's models (`make demo`): big enough that a CPU is the bottleneck, so prefill is compute-bound and
# decode memory-bound and their MFU, MBU and speed of light mean something (the tiny ones measure Python).
ENGINE_CONFIGS["small-llama-engine"] = {  # 137 M parameters: 12 layers of 1,024, GQA 16/4
    **_COMMON, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 1024,
    "num_attention_heads": 16, "num_key_value_heads": 4, "num_hidden_layers": 12, "intermediate_size": 2816,
    "hidden_act": "silu",
}
ENGINE_CONFIGS["small-qwen3-moe-engine"] = {  # 165 M parameters, 33 M active: 8 layers of 16 experts, top-2
    **_COMMON, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 768,
    "num_attention_heads": 12, "num_key_value_heads": 4, "num_hidden_layers": 8, "intermediate_size": 2048,
    "moe_intermediate_size": 512, "num_experts": 16, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "norm_topk_prob": True, "hidden_act": "silu",
}

# A one-layer draft model for the tiny Llama (same vocabulary and tokenizer): speculative decoding with
# `"method": "draft_model"`, whose drafter work the accounting counts as vLLM runs it.
ENGINE_CONFIGS["tiny-llama-draft-engine"] = {**ENGINE_CONFIGS["tiny-llama-engine"], "num_hidden_layers": 1}

# Text the tokenizer is trained on and prompts are drawn from (public-domain style prose).
CORPUS = """\
The engine schedules requests in iterations. Each iteration runs one forward pass over a batch.
Prefill processes the prompt; decode produces one token at a time from the cache of keys and values.
A serving engineer asks how much of the accelerator is really used, and model flops utilization
answers by dividing the useful work by the time and the peak of the hardware. Speculative decoding
proposes draft tokens and the target model verifies them; accepted tokens are kept, rejected ones
are thrown away. Mixture of experts layers route every token to a few experts chosen by a router.
Prefix caching reuses the keys and values of a shared system prompt so that the work is not done
again. When memory runs out, a request is preempted and later computed again from the beginning.
""" * 4

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# what each model's tokenizer is trained on (default: the corpus and the load generator's words)
TOKENIZER_TEXT: dict[str, str] = {"tiny-llama-bpe512-engine": "corpus"}


def _train_tokenizer(out: Path, vocab_size: int, text: str = "corpus+words") -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    texts = [CORPUS] if text == "corpus" else [CORPUS, " ".join(WORDS.tolist()) * 8]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def _build(name: str, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(ENGINE_CONFIGS[name])
    model_type = cfg.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    # Unit-scale tied embeddings over small layer weights: greedy decoding tends to repeat the last
    # token, so n-gram speculation gets both rejected drafts (early) and accepted ones (later).
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 if "embed" in pname else 0.05)
    model.save_pretrained(out, safe_serialization=True)
    _train_tokenizer(out, cfg["vocab_size"], _tokenizer_text(name))
    (out / "serving_mfu_model.json").write_text(json.dumps(_marker(name)))


def _tokenizer_text(name: str) -> str:
    return TOKENIZER_TEXT.get(name, "corpus+words")


def _marker(name: str) -> dict[str, Any]:
    """What a built folder records of its recipe: rebuilt when the recipe changes."""
    return {"name": name, "config": ENGINE_CONFIGS[name], "tokenizer": _tokenizer_text(name)}


def _built(marker: Path, name: str) -> bool:
    if not marker.exists():
        return False
    got = json.loads(marker.read_text())
    return got.get("config") == ENGINE_CONFIGS[name] and got.get("tokenizer", "corpus+words") == _tokenizer_text(name)


def ensure_model(name: str = "tiny-llama-engine", root: str | Path | None = None) -> Path:
    """Path of the built model folder, building it first if absent (safe across processes)."""
    if name not in ENGINE_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(ENGINE_CONFIGS)}")
    root = Path(root) if root else load_settings()[0].models_dir()
    out = root / name
    marker = out / "serving_mfu_model.json"
    if _built(marker, name):
        return out
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _built(marker, name):
            return out
        tmp = root / f".{name}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        _build(name, tmp)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
    return out
