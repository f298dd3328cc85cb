"""A tiny Llama-shaped model and word-level tokenizer, for tests and the bundled example.

Nothing can be downloaded on a laptop without a hub token or in CI, so the example trains a
model built here from a config: 2 layers, hidden 64, random weights (seeded, so every rank
and every run builds the same one), and a word-level tokenizer over the words of the bundled
data sets and the alpaca template. Like Llama's tokenizer it has <unk>=0, <s>=1, </s>=2 and
*no* pad token, so the trainer's pad-token handling is exercised too.

`bundled://NAME` in model.name / dataset.name refers to these files (see `resolve_bundled`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

BUNDLED_PREFIX = "bundled://"
TINY_MODEL = "tiny-llama"
# Bump when the tiny model changes, so cached copies are rebuilt.
TINY_MODEL_VERSION = 1
_WORD = re.compile(r"\w+|[^\w\s]")


def examples_dir() -> Path:
    return Path(__file__).resolve().parent / "examples"


def resolve_bundled(name: str) -> str:
    """Map `bundled://X` to a real path: a file under examples/, or the tiny model (built once)."""
    if not name.startswith(BUNDLED_PREFIX):
        return name
    item = name[len(BUNDLED_PREFIX) :]
    if item == TINY_MODEL:
        return str(ensure_tiny_model())
    path = examples_dir() / item
    if not path.exists():
        known = [*sorted(p.name for p in examples_dir().iterdir()), TINY_MODEL]
        raise FileNotFoundError(f"{name}: no bundled item {item!r}; bundled: {', '.join(known)}")
    return str(path)


def ensure_tiny_model() -> Path:
    """The tiny model in a per-user cache, built on first use.

    Every rank may call this at once: each builds into a temporary folder and renames it into
    place; a rename that loses the race is harmless because the build is deterministic.
    """
    cache = Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune-trainer"))
    target = cache / f"{TINY_MODEL}-v{TINY_MODEL_VERSION}"
    if (target / "config.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL}-", dir=cache))
    make_tiny_model(scratch)
    try:
        scratch.rename(target)
    except OSError:  # another rank won the race
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _vocabulary() -> list[str]:
    from finetune_trainer.data import PROMPT_TEMPLATE

    text = " ".join(PROMPT_TEMPLATE.values())
    for path in sorted(examples_dir().iterdir()):
        if path.suffix in (".json", ".jsonl"):
            text += " " + path.read_text()
    words = set(_WORD.findall(text))
    return sorted(words)


def make_tokenizer(directory: Path) -> None:
    """A word-level fast tokenizer: <unk> <s> </s> and the words of the bundled data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in _vocabulary():
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    # Like Llama: <s> in front of every sequence, no </s> (the data code appends it).
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(directory))


def make_tiny_model(directory: Path | str, seed: int = 0) -> Path:
    """Write a tiny random Llama (config, safetensors weights) and its tokenizer to `directory`."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    make_tokenizer(directory)
    vocab_size = len(json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"])
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():  # leave the caller's random state alone
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    # Not model.save_pretrained: under an initialised process group only rank 0 writes there,
    # and every rank may be building its own copy here.
    config.save_pretrained(str(directory))
    save_file(model.state_dict(), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
