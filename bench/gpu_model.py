"""A Mistral-7B-shaped random model, 4-bit quantized, in mlx-lm's format, and a data set for it.

Usage::

    python bench/gpu_model.py OUT [--layers 32] [--hidden 4096] [--heads 32] [--kv-heads 8]
                                  [--intermediate 14336] [--vocab 32000] [--rope-theta 1e6]
                                  [--bits 4] [--group-size 64] [--words 600] [--n-train 64]

Writes ``OUT/model`` (config.json with the "quantization" field, model.safetensors, or
shards and model.safetensors.index.json past mlx-lm's 5 GB shard size, and the tokenizer
files) and ``OUT/data`` ({train,valid,test}.jsonl in mlx-lm's text format). Both
``mlx_lm.load`` and loractl's trainer load the model; ``mlx_lm.lora`` and loractl train on it.

The defaults are Mistral-7B-Instruct-v0.2's shape (hidden 4096, 32 layers, 32 heads, 8 kv
heads, intermediate 14336, vocab 32000, rope theta 1e6, no sliding window, untied lm_head).
The smaller flags exist so the same code runs at a toy size on a CPU.

Memory. The weights are drawn directly in bfloat16 on MLX's default device (the GPU on a CUDA
build) and quantized with mlx-lm's own ``quantize_model`` (``nn.quantize``, group size 64, 4
bits, affine, as mlx-community's 4-bit conversions) while still lazy; then one matrix at a time
is evaluated, so only one matrix's draw (at most 0.26 GB of bfloat16, plus its float32
temporaries) exists besides the quantized weights done so far. The build peaks a little above
the quantized size (about 4 GB at full size; measured on a CPU at 4 layers: 1.43 GB peak for
0.64 GB quantized, the excess being the 32000 x 4096 embedding's draw), never at the 14.5 GB
of bfloat16 or the 29 GB of float32 weights.

The tokenizer and the text come from ``loractl.daemon.tinymodel`` (a byte-level BPE trained on
its synthetic stories, filled to the vocabulary size with made-up words; its story
generator), so nothing is downloaded. ``--words`` sets the words per sample (about 1.1 tokens
each at vocabulary 32000; each sample gets 0.9-1.3 times that many).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

__all__ = ["build", "mistral_config", "write_data", "write_model"]

# Mistral-7B-Instruct-v0.2's shape.
MISTRAL_7B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 32000,
    "rope_theta": 1_000_000.0,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
}


def _tokenizer_preset(vocab_size: int, max_positions: int):
    """tinymodel's ladder preset at this vocabulary: the tokenizer depends on the preset only,
    so every data set written by ``write_data`` tokenizes alike."""
    from loractl.daemon.tinymodel import PRESETS

    return replace(
        PRESETS["ladder"],
        name=f"mistral-v{vocab_size}",
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
    )


def mistral_config(shape: dict, ids: dict[str, int]) -> dict:
    """A Hugging Face style config.json for mlx-lm's llama model (model_type mistral)."""
    from loractl.daemon.tinymodel import BOS, EOS, PAD

    return {
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "hidden_act": "silu",
        "hidden_size": shape["hidden_size"],
        "num_hidden_layers": shape["num_hidden_layers"],
        "num_attention_heads": shape["num_attention_heads"],
        "num_key_value_heads": shape["num_key_value_heads"],
        "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
        "intermediate_size": shape["intermediate_size"],
        "vocab_size": shape["vocab_size"],
        "rope_theta": shape["rope_theta"],
        "max_position_embeddings": shape["max_position_embeddings"],
        "rms_norm_eps": shape["rms_norm_eps"],
        "sliding_window": None,
        "tie_word_embeddings": False,
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD],
        "torch_dtype": "bfloat16",
    }


def write_model(
    out_dir: Path, shape: dict, *, bits: int = 4, group_size: int = 64, seed: int = 0
) -> dict:
    """Write the tokenizer, the quantized random weights and config.json to ``out_dir``;
    return a summary (parameter count, bytes, seconds, MLX peak memory)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import llama
    from mlx_lm.utils import quantize_model, save_config, save_model

    from loractl.daemon.tinymodel import _write_tokenizer

    tic = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = _write_tokenizer(
        _tokenizer_preset(shape["vocab_size"], shape["max_position_embeddings"]), out_dir
    )
    tokenizer_s = time.perf_counter() - tic
    config = mistral_config(shape, ids)

    # The module tree only: its own float32 initial values are lazy and are replaced below
    # before anything evaluates them, so they never take memory.
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.random.seed(seed)
    fresh = []
    for name, param in tree_flatten(model.parameters()):
        if name.endswith("norm.weight"):
            fresh.append((name, mx.ones(param.shape, dtype=mx.bfloat16)))
        else:
            fresh.append((name, mx.random.normal(param.shape, dtype=mx.bfloat16, scale=0.02)))
    model.update(tree_unflatten(fresh))
    parameters = sum(p.size for _, p in fresh)
    del fresh
    # Still lazy: quantize_model swaps each Linear/Embedding for its quantized twin, whose
    # weights are mx.quantize of the (unevaluated) bfloat16 draw.
    model, config = quantize_model(model, config, group_size, bits)
    # One matrix at a time, so only one matrix's draw (and its float32 temporaries) is alive
    # at once besides the quantized weights done so far.
    leaves = tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module))
    for _, leaf in leaves:
        mx.eval(leaf.parameters())
    weights_s = time.perf_counter() - tic - tokenizer_s
    peak_build = mx.get_peak_memory()
    nbytes = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    save_model(out_dir, model, donate_model=True)
    save_config(config, out_dir / "config.json")
    return {
        "path": str(out_dir),
        "parameters": parameters,
        "quantized_bytes": nbytes,
        "bits": bits,
        "group_size": group_size,
        "device": str(mx.default_device()),
        "mlx_peak_gb": round(peak_build / 1e9, 3),
        "tokenizer_s": round(tokenizer_s, 1),
        "weights_s": round(weights_s, 1),
        "total_s": round(time.perf_counter() - tic, 1),
    }


def write_data(
    out_dir: Path,
    *,
    words: int,
    n_train: int = 64,
    n_valid: int = 8,
    seed: int = 0,
    vocab_size: int = MISTRAL_7B["vocab_size"],
) -> Path:
    """{train,valid,test}.jsonl of text samples of about ``words`` words (0.9-1.3 times),
    written by tinymodel's ``build_dataset``."""
    from loractl.daemon.tinymodel import PRESETS, build_dataset

    preset = replace(
        _tokenizer_preset(vocab_size, MISTRAL_7B["max_position_embeddings"]),
        name=f"mistral-data-w{words}-n{n_train}-v{n_valid}",
        words_per_sample=words,
        n_train=n_train,
        n_valid=n_valid,
    )
    # build_dataset takes a preset by name: register this one (in this process only).
    PRESETS.setdefault(preset.name, preset)
    return build_dataset(Path(out_dir), preset.name, seed, fmt="text")


def build(
    out: Path, shape: dict, *, bits: int, group_size: int, seed: int, words: int, n_train: int
) -> dict:
    out = Path(out)
    summary = write_model(out / "model", shape, bits=bits, group_size=group_size, seed=seed)
    tic = time.perf_counter()
    write_data(
        out / "data", words=words, n_train=n_train, seed=seed, vocab_size=shape["vocab_size"]
    )
    summary["data"] = str(out / "data")
    summary["data_s"] = round(time.perf_counter() - tic, 1)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/gpu_model.py",
        description="Write a random Mistral-7B-shaped 4-bit model and a text data set.",
    )
    parser.add_argument("out", type=Path, help="folder for model/ and data/")
    m = MISTRAL_7B
    parser.add_argument("--layers", type=int, default=m["num_hidden_layers"])
    parser.add_argument("--hidden", type=int, default=m["hidden_size"])
    parser.add_argument("--heads", type=int, default=m["num_attention_heads"])
    parser.add_argument("--kv-heads", type=int, default=m["num_key_value_heads"])
    parser.add_argument("--intermediate", type=int, default=m["intermediate_size"])
    parser.add_argument("--vocab", type=int, default=m["vocab_size"])
    parser.add_argument("--rope-theta", type=float, default=m["rope_theta"])
    parser.add_argument("--max-positions", type=int, default=m["max_position_embeddings"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--words", type=int, default=600, help="words per training sample")
    parser.add_argument("--n-train", type=int, default=64, help="training samples")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = dict(
        MISTRAL_7B,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        rope_theta=args.rope_theta,
        max_position_embeddings=args.max_positions,
    )
    summary = build(
        args.out,
        shape,
        bits=args.bits,
        group_size=args.group_size,
        seed=args.seed,
        words=args.words,
        n_train=args.n_train,
    )
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
