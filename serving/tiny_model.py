"""Offline models of the Qwen2 architecture with random weights: no model hub needed.

``make_tiny_model``: a few MB, made in seconds, with a byte-level BPE tokenizer
trained on a few sentences. Tests use it.

``make_qwen25_shaped_model``: Qwen2.5-0.5B's exact configuration (about 1 GB in
bfloat16) with a tokenizer of the same vocabulary size, so that benchmarks
measure the same work as the real model.

Both carry Qwen2.5-Instruct's chat template (``<|im_start|>role ... <|im_end|>``).
Their answers are noise, but deterministic at temperature 0.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2.5-Instruct's template, trimmed of tool calling.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Triton Inference Server serves models over HTTP and gRPC.",
    "vLLM batches requests continuously and pages its key-value cache.",
    "What is the capital of France? Paris is the capital of France.",
    "Write a short poem about the sea, the wind and the stars.",
    "Large language models predict the next token from the previous ones.",
    "Hello, world! How are you today? I am fine, thank you.",
    "你好，世界。今天天气很好。",
    "0123456789 + - * / = ( ) [ ] { } < > : ; , . ! ? ' \"",
]

VOCAB_SIZE = 1024
MAX_POSITIONS = 2048


def make_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return save_tokenizer(tok, out_dir, eos="<|im_end|>", max_length=MAX_POSITIONS)


def save_tokenizer(tok, out_dir: Path, eos: str, max_length: int):
    """Add the special tokens and the chat template, and save in Hugging Face format."""
    from transformers import PreTrainedTokenizerFast

    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_length,
    )
    fast.save_pretrained(out_dir)
    return fast


def save_random_model(config, out_dir: Path, seed: int) -> Path:
    """Random bfloat16 weights for ``config``, saved with its generation config."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    return out_dir


# Qwen/Qwen2.5-0.5B's published config.json.
QWEN25_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}
QWEN25_REGULAR_TOKENS = 151643  # then <|endoftext|>, <|im_start|>, <|im_end|>


def synthetic_bpe_tokenizer(out_dir: Path, regular_tokens: int, seed: int = 0):
    """A byte-level BPE with exactly ``regular_tokens`` tokens, made of random merges."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    rng = random.Random(seed)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tokens = list(vocab)
    merges = []
    while len(vocab) < regular_tokens:
        left, right = rng.choice(tokens), rng.choice(tokens[:4096])
        merged = left + right
        if merged in vocab or len(merged) > 12:
            continue
        vocab[merged] = len(vocab)
        tokens.append(merged)
        merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return save_tokenizer(tok, out_dir, eos="<|endoftext|>", max_length=QWEN25_05B["max_position_embeddings"])


def make_qwen25_shaped_model(out_dir: Path, seed: int = 0) -> Path:
    """Write a model with Qwen2.5-0.5B's configuration, random weights and vocabulary size."""
    from transformers import Qwen2Config

    out_dir.mkdir(parents=True, exist_ok=True)
    synthetic_bpe_tokenizer(out_dir, QWEN25_REGULAR_TOKENS, seed)
    return save_random_model(Qwen2Config(**QWEN25_05B, torch_dtype="bfloat16"), out_dir, seed)


def make_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Write a Qwen2ForCausalLM with random weights and its tokenizer to ``out_dir``."""
    from transformers import Qwen2Config

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: the CPU attention kernels need it
        num_key_value_heads=1,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        torch_dtype="bfloat16",
    )
    return save_random_model(config, out_dir, seed)


def make_lora_adapter(model_dir: Path, out_dir: Path, rank: int = 8, seed: int = 1) -> Path:
    """A PEFT-format LoRA adapter on q_proj and v_proj of ``model_dir``, random weights.

    Both LoRA matrices are non-zero, so the adapter changes the model's answers.
    """
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    head_dim = config.hidden_size // config.num_attention_heads
    outputs = {"q_proj": config.hidden_size, "v_proj": config.num_key_value_heads * head_dim}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module, out_features in outputs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            shapes = {"lora_A": (rank, config.hidden_size), "lora_B": (out_features, rank)}
            for part, shape in shapes.items():
                tensors[f"{prefix}.{part}.weight"] = torch.randn(shape, generator=generator) * 0.5
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "adapter_model.safetensors")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(model_dir),
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(outputs),
        "bias": "none",
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out_dir
