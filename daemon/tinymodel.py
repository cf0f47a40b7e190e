"""Deterministic tiny models and data sets for the demo and the tests.

Nothing here downloads: the model is a random Llama written with numpy, the tokenizer is a
byte-level BPE trained on a synthetic corpus, and everything loads with ``mlx_lm.load(path)``
offline. The same (preset, seed) gives byte-identical files in any process.

Presets. Figures measured on this project's Linux CPU machines (MLX 0.32.4 CPU build, 2 cores):
``mlx_lm.load``, LoRA rank 8 on every layer, one sample per step, ``default_loss`` and an AdamW
update, median of a few steps, each sequence length in its own process. RSS is the process
footprint (psutil RSS and ru_maxrss agree within 1 MB) and includes transformers, which
``mlx_lm.load`` imports; about 113 MB of it (85 MB for tiny) is there before the first step.

- ``tiny``: vocab 512, hidden 32, 2 layers, 4 heads / 2 kv heads (head_dim 8), intermediate 64,
  tied embeddings; 64 train / 16 valid / 16 test samples, 326-493 tokens each for seed 0. As
  small as a real model gets, so the suite stays fast.

  | seq | RSS | MLX peak | step (compiled) |
  |---|---|---|---|
  | 256 | 101 MB | 7 MB | 0.038 s |
  | 128 | 95 MB | 3 MB | 0.015 s |

- ``ladder``: vocab 8192, hidden 256, 4 layers, 4 heads / 2 kv heads, intermediate 512, tied
  embeddings; 128 train / 16 valid / 16 test samples, 321-465 tokens each for seed 0. Shaped so
  that sequence length visibly drives memory (RSS +24% from 128 to 256) while a step still
  takes about a second. Three runs each:

  | seq | RSS compiled | RSS uncompiled | MLX peak | step compiled | step uncompiled |
  |---|---|---|---|---|---|
  | 256 | 190-191 MB | 183-186 MB | 82 MB | 1.20-1.27 s | 1.20-1.24 s |
  | 128 | 153-155 MB | 148-149 MB | 50 MB | 0.56-0.57 s | 0.57 s |

  Both grow with the vocabulary as much as with the sequence (see DESIGN.md's CPU table): the
  logits and their gradient are seq x vocab floats.

- ``varlen``: the tiny model's shape at vocab 1024 and hidden 64, with samples whose lengths
  spread (log-uniformly) from about 16 to 512 tokens, trained at batch size 4 and
  max_seq_length 512: the case where length-sorted batching matters (bench/overhead.py
  --preset varlen).

- ``moe``: the tiny preset as a Mixtral-shaped mixture of experts (4 experts, 2 per token,
  mlx-lm's ``SwitchGLU``), so LoRA covers ``SwitchLinear`` layers with 3-D adapter tensors.

Any preset can also be written 4-bit quantized (``quantize_model``, mlx-lm's own convert), for
QLoRA.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["PRESETS", "Preset", "build_dataset", "build_model", "main", "prepare"]


@dataclass(frozen=True)
class Preset:
    """Model shape, data-set size and job settings for one named tiny setup."""

    name: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    n_train: int
    n_valid: int
    words_per_sample: int
    iters: int
    steps_per_eval: int
    max_position_embeddings: int = 1024
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    # A mixture of experts when set: mlx-lm's mixtral, with SwitchGLU experts.
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    # When set, sample lengths spread log-uniformly between these word counts instead of
    # clustering around words_per_sample.
    min_words: int = 0
    max_words: int = 0
    # The job.yaml's batching.
    batch_size: int = 1
    grad_accumulation_steps: int = 4
    max_seq_length: int = 256

    @property
    def model_type(self) -> str:
        return "mixtral" if self.num_local_experts else "llama"


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        vocab_size=512,
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        n_train=64,
        n_valid=16,
        # Words take about 2.2 tokens with a 512 vocabulary, so samples land over 300 tokens
        # and max_seq_length 256 always truncates.
        words_per_sample=160,
        iters=48,
        steps_per_eval=16,
    ),
    "ladder": Preset(
        name="ladder",
        vocab_size=8192,
        hidden_size=256,
        num_hidden_layers=4,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        n_train=128,
        n_valid=16,
        # A large vocabulary makes nearly every word one token, so samples need more words.
        words_per_sample=300,
        iters=64,
        steps_per_eval=24,
    ),
    "varlen": Preset(
        name="varlen",
        vocab_size=1024,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        n_train=128,
        n_valid=16,
        words_per_sample=0,
        # About 1.2 tokens a word at this vocabulary: 16 to 512 tokens.
        min_words=13,
        max_words=430,
        iters=96,
        steps_per_eval=48,
        batch_size=4,
        grad_accumulation_steps=1,
        max_seq_length=512,
    ),
    "moe": Preset(
        name="moe",
        vocab_size=512,
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        n_train=64,
        n_valid=16,
        words_per_sample=160,
        iters=48,
        steps_per_eval=16,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
}

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)

# The role markers are special tokens so a chat turn costs one token of overhead, and the
# generation prompt lets mask_prompt find where the assistant's answer begins.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}\n{% endif %}"
)

# Streams of the seeded RNG, kept apart so that adding a split never shifts the weights.
_STREAM_WEIGHTS, _STREAM_TOKENIZER, _STREAM_SPLITS, _STREAM_LEXICON = 1, 2, 3, 4
# The tokenizer depends on the preset only, so every seed's data set tokenizes alike and the
# length guarantees above hold for any seed.
_TOKENIZER_CORPUS_SEED = 0
_TOKENIZER_CORPUS_SAMPLES = 256

_WORDS = {
    "name": (
        "Ada Ben Cleo Dara Eli Fern Gus Hana Ivo June Kai Lena Milo Nora Otto Pia Quin Rosa "
        "Sami Tove Uma Vik Wren Yara Zeno"
    ).split(),
    "adj": (
        "quiet bright small heavy green old young warm cold gentle brave curious tired happy "
        "silver golden narrow wide early late soft loud careful clever patient hungry busy "
        "distant hidden broken simple strange calm wild"
    ).split(),
    "noun": (
        "river garden window mountain teacher baker lantern forest kettle engine village "
        "harbor letter market bridge orchard painter farmer candle library station island "
        "meadow tower wagon sailor clock mirror basket ladder valley cottage meadowlark "
        "fox rabbit heron badger otter sparrow"
    ).split(),
    "verb": (
        "found carried opened watched painted followed repaired visited crossed counted "
        "cleaned built noticed remembered lifted shared borrowed mended gathered measured "
        "studied planted described packed"
    ).split(),
    "intrans": (
        "waited laughed wandered rested listened slept sang worked travelled returned "
        "paused whispered smiled hurried"
    ).split(),
    "adv": (
        "slowly quickly softly carefully happily quietly early again together alone "
        "outside patiently"
    ).split(),
    "prep": "near behind beside under above across through beyond inside toward".split(),
    "time": (
        "in the morning|at noon|before dinner|after the rain|during the winter|"
        "on the first day|late at night|every spring"
    ).split("|"),
}

_TEMPLATES = (
    "The {adj} {noun} {verb} the {noun} {prep} the {noun}.",
    "{name} {verb} a {adj} {noun} {time}.",
    "When the {noun} {intrans}, {name} {verb} the {adj} {noun}.",
    "Every {noun} {prep} the {noun} was {adj}, so {name} {intrans} {adv}.",
    "{name} and {name} {intrans} {prep} the {adj} {noun} {time}.",
    "Nobody knew why the {noun} {intrans} {adv}, but the {noun} was {adj}.",
    "{time}, the {adj} {noun} {verb} {name}'s {noun}.",
    "{name} asked whether the {noun} had {verb} the {noun}, and the {noun} {intrans}.",
)


def _preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def _rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def _sentence(rng: np.random.Generator) -> str:
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    parts = template.split("{")
    out = [parts[0]]
    for part in parts[1:]:
        slot, rest = part.split("}", 1)
        words = _WORDS[slot]
        out.append(words[rng.integers(len(words))] + rest)
    text = "".join(out)
    return text[0].upper() + text[1:]


def _story(rng: np.random.Generator, preset: Preset) -> tuple[str, str]:
    """Return (topic, text): a prompt-like topic and a paragraph of the preset's length."""
    adj = _WORDS["adj"][rng.integers(len(_WORDS["adj"]))]
    noun = _WORDS["noun"][rng.integers(len(_WORDS["noun"]))]
    if preset.max_words:
        target = int(np.exp(rng.uniform(np.log(preset.min_words), np.log(preset.max_words))))
        words = " ".join(_sentence(rng) for _ in range(target // 4 + 2)).split()
        return f"Tell a story about the {adj} {noun}.", " ".join(words[:target])
    # Spread lengths so a sorted, length-bucketed iterator still sees different batches.
    target = int(preset.words_per_sample * rng.uniform(0.9, 1.3))
    sentences: list[str] = []
    count = 0
    while count < target:
        sentence = _sentence(rng)
        sentences.append(sentence)
        count += len(sentence.split())
    return f"Tell a story about the {adj} {noun}.", " ".join(sentences)


def _lexicon(n: int) -> list[str]:
    """``n`` distinct made-up words, the same for every seed."""
    rng = _rng(_TOKENIZER_CORPUS_SEED, _STREAM_LEXICON)
    onsets = "b c d f g h j k l m n p r s t v w z br dr gr kl pl st tr sk th sh ch".split()
    vowels = "a e i o u ai ea ou".split()
    codas = ["", "", "n", "r", "l", "s", "th", "nd", "rk", "st"]
    seen: set[str] = set()
    words: list[str] = []
    while len(words) < n:
        syllables = int(rng.integers(2, 5))
        word = "".join(
            onsets[rng.integers(len(onsets))]
            + vowels[rng.integers(len(vowels))]
            + codas[rng.integers(len(codas))]
            for _ in range(syllables)
        )
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _corpus(preset: Preset, seed: int, stream: int, split: int, n: int) -> list[tuple[str, str]]:
    rng = _rng(seed, stream, split)
    return [_story(rng, preset) for _ in range(n)]


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _train_tokenizer(preset: Preset):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = _corpus(
        preset, _TOKENIZER_CORPUS_SEED, _STREAM_TOKENIZER, 0, _TOKENIZER_CORPUS_SAMPLES
    )
    texts = [text for pair in corpus for text in pair]
    # Stories alone use under a thousand distinct words, so BPE would stop far short of a large
    # vocabulary; ids the tokenizer lacks then decode as "!" in mlx-lm's streaming detokenizer.
    # Made-up words fill the vocabulary, while the stories, being most of the text, still claim
    # the first merges.
    lexicon = _lexicon(preset.vocab_size)
    texts += [" ".join(lexicon[i : i + 16]) for i in range(0, len(lexicon), 16)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=preset.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # Every byte must be in the vocabulary, or text outside the corpus could not be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    # Llama tokenizers start every encoding with BOS; mlx-lm's TextDataset relies on encode()
    # behaving like that, while chat templates add bos_token themselves.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def _write_tokenizer(preset: Preset, out_dir: Path) -> dict[str, int]:
    tok = _train_tokenizer(preset)
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "model_max_length": preset.max_position_embeddings,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        out_dir / "special_tokens_map.json",
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD},
    )
    return ids


def _model_config(preset: Preset, ids: dict[str, int]) -> dict:
    experts = {}
    if preset.num_local_experts:
        experts = {
            "num_local_experts": preset.num_local_experts,
            "num_experts_per_tok": preset.num_experts_per_tok,
        }
    return {
        "model_type": preset.model_type,
        "architectures": [f"{preset.model_type.capitalize()}ForCausalLM"],
        **experts,
        "hidden_size": preset.hidden_size,
        "num_hidden_layers": preset.num_hidden_layers,
        "intermediate_size": preset.intermediate_size,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.num_key_value_heads,
        "rms_norm_eps": preset.rms_norm_eps,
        "vocab_size": preset.vocab_size,
        "rope_theta": preset.rope_theta,
        "tie_word_embeddings": preset.tie_word_embeddings,
        "max_position_embeddings": preset.max_position_embeddings,
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD],
        "torch_dtype": "float32",
    }


def _parameter_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes exactly as mlx-lm's Model for the config's model_type declares them."""
    import importlib

    from mlx.utils import tree_flatten

    # Instantiating the real class (cheap: parameters are lazy until evaluated) keeps the names
    # right if mlx-lm ever renames a module.
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    return {name: tuple(p.shape) for name, p in tree_flatten(model.parameters())}


def build_model(out_dir: Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random model (Llama, or Mixtral for ``moe``) with its tokenizer to ``out_dir``
    and return ``out_dir``."""
    from safetensors.numpy import save

    p = _preset(preset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = _write_tokenizer(p, out_dir)
    config = _model_config(p, ids)
    _write_json(out_dir / "config.json", config)

    rng = _rng(seed, _STREAM_WEIGHTS)
    weights: dict[str, np.ndarray] = {}
    # Sorted, so the draw order (and hence every value) is independent of module order.
    for name, shape in sorted(_parameter_shapes(config).items()):
        if name.endswith("norm.weight"):
            weights[name] = np.ones(shape, dtype=np.float32)
        else:
            weights[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    # Bytes, not save_file, so the file gets the same permissions as its neighbours.
    (out_dir / "model.safetensors").write_bytes(save(weights, metadata={"format": "mlx"}))
    return out_dir


def quantize_model(source: Path, out_dir: Path, bits: int = 4, group_size: int = 32) -> Path:
    """Write ``source`` quantized to ``out_dir`` with mlx-lm's own convert, for QLoRA.

    The tiny models are 32 wide, so the group size must be 32 (mlx-lm's default is 64).
    """
    from mlx_lm import convert

    convert(str(source), str(out_dir), quantize=True, q_bits=bits, q_group_size=group_size)
    return Path(out_dir)


def _records(corpus: list[tuple[str, str]], fmt: str) -> list[dict]:
    if fmt == "text":
        return [{"text": text} for _, text in corpus]
    if fmt == "completions":
        return [{"prompt": topic, "completion": text} for topic, text in corpus]
    if fmt == "chat":
        return [
            {
                "messages": [
                    {"role": "user", "content": topic},
                    {"role": "assistant", "content": text},
                ]
            }
            for topic, text in corpus
        ]
    raise ValueError(f"unknown format {fmt!r}; choose text, completions or chat")


def build_dataset(out_dir: Path, preset: str = "tiny", seed: int = 0, fmt: str = "text") -> Path:
    """Write train/valid/test JSONL in one of mlx-lm's formats to ``out_dir``; return it."""
    p = _preset(preset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {"train": p.n_train, "valid": p.n_valid, "test": p.n_valid}
    for split_index, (split, n) in enumerate(sizes.items()):
        corpus = _corpus(p, seed, _STREAM_SPLITS, split_index, n)
        lines = [json.dumps(r, sort_keys=True) + "\n" for r in _records(corpus, fmt)]
        (out_dir / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    return out_dir


def _job_yaml(p: Preset, seed: int, out_dir: Path) -> str:
    # Written by hand, not yaml.dump, so the learning rate reads 1.0e-4 (which YAML 1.1 and
    # PyYAML parse as a float, unlike 1e-4) and the key order stays the documented one.
    # Paths are absolute (JSON strings are valid YAML scalars, spaces included) so the file
    # still works once copied elsewhere, into the inbox for one.
    def where(name: str) -> str:
        return json.dumps(str((out_dir / name).resolve()))

    return f"""\
# A loractl job for the {p.name!r} tiny model; also a valid mlx_lm.lora config.
name: {p.name}-seed{seed}
model: {where("model")}
data: {where("data")}
fine_tune_type: lora
optimizer: adamw
num_layers: -1
batch_size: {p.batch_size}
iters: {p.iters}
learning_rate: 1.0e-4
lr_schedule:
  name: cosine_decay
  arguments: [1.0e-4, {p.iters}]
lora_parameters:
  rank: 8
  scale: 20.0
  dropout: 0.1
max_seq_length: {p.max_seq_length}
grad_accumulation_steps: {p.grad_accumulation_steps}
steps_per_eval: {p.steps_per_eval}
val_batches: 2
seed: {seed}
adapter_path: {where("adapters")}
checkpoint_every: 2
keep_checkpoints: 3
"""


def prepare(out_dir: Path, preset: str = "tiny", seed: int = 0) -> dict[str, Path]:
    """Write ``model/``, ``data/`` (text format) and ``job.yaml`` under ``out_dir``."""
    p = _preset(preset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(out_dir / "model", preset, seed)
    data = build_dataset(out_dir / "data", preset, seed, fmt="text")
    config = out_dir / "job.yaml"
    config.write_text(_job_yaml(p, seed, out_dir), encoding="utf-8")
    return {"model": model, "data": data, "config": config}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loractl.daemon.tinymodel",
        description="Write a tiny random model, a synthetic data set and a job.yaml.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = prepare(args.out_dir, args.preset, args.seed)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    print(json.dumps(asdict(PRESETS[args.preset]), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
