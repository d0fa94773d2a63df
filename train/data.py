"""Training data: files, directories or JSONL tokenized into one stream; deterministic batches by step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst", ".c", ".h", ".js", ".ts", ".java", ".go", ".rs", ".json", ".toml",
                 ".yaml", ".yml", ".sh", ".html", ".css", ".cpp", ".jsonl"}


def read_texts(paths: list[str], text_field: str = "text") -> list[str]:
    """Documents from text/code files, directories of them (recursively) and JSONL files."""
    docs: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"training data {raw!r} does not exist")
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES) if path.is_dir() \
            else [path]
        for f in files:
            text = f.read_text(errors="replace")
            if f.suffix == ".jsonl":
                for n, line in enumerate(text.splitlines(), 1):
                    if line.strip():
                        try:
                            docs.append(str(json.loads(line)[text_field]))
                        except (json.JSONDecodeError, KeyError, TypeError):
                            raise ValueError(f"{f}:{n} is not a JSON object with a {text_field!r} field") from None
            elif text.strip():
                docs.append(text)
    if not docs:
        raise ValueError(f"no text found in {paths}")
    return docs


def tokenize(docs: list[str], tokenizer, eos_id: int | None) -> np.ndarray:
    """All documents as one int32 stream, separated by EOS where the model has one."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos_id is not None:
            ids.append(eos_id)
    return np.asarray(ids, np.int32)


class Batches:
    """Batch `step` is a pure function of (seed, step): a killed run resumes on exactly the same data."""

    def __init__(self, stream: np.ndarray, seq_len: int, batch_size: int, seed: int, holdout: float = 0.05):
        if len(stream) < 2 * seq_len + 1:
            raise ValueError(f"training data has {len(stream)} tokens; need at least {2 * seq_len + 1} "
                             f"for seq_len {seq_len} (lower --seq-len or add data)")
        split = max(seq_len + 1, min(int(len(stream) * (1 - holdout)), len(stream) - seq_len))
        self.train, self.heldout = stream[:split], stream[split:]  # disjoint: evaluation never sees training text
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed

    def batch(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.train) - self.seq_len + 1, self.batch_size)
        return np.stack([self.train[s:s + self.seq_len] for s in starts])

    def eval_prompts(self, n: int, length: int) -> list[list[int]]:
        """Held-back prompts for measuring tokens per forward pass during training."""
        stride = max(1, (len(self.heldout) - length) // max(n, 1))
        return [self.heldout[i * stride:i * stride + length].tolist() for i in range(n)
                if i * stride + length <= len(self.heldout)]


class RowBatches:
    """Batches of whole rows (prompt + continuation) with a target mask; batch `step` is a pure function of
    (seed, step). The last `holdout` fraction of rows is held back: its prompts measure decoding during training.
    """

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, batch_size: int, seed: int, holdout: float = 0.05):
        if len(tokens) < 2:
            raise ValueError(f"need at least 2 training rows, got {len(tokens)} (raise --self-samples)")
        split = min(len(tokens) - 1, max(1, round(len(tokens) * (1 - holdout))))
        self.tokens, self.mask, self.heldout = tokens[:split], mask[:split], (tokens[split:], mask[split:])
        self.batch_size, self.seed = batch_size, seed

    def rows(self, step: int) -> np.ndarray:
        """Indices into self.tokens of batch `step`'s rows."""
        return np.random.default_rng([self.seed, step]).integers(0, len(self.tokens), self.batch_size)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.rows(step)
        return self.tokens[rows], self.mask[rows]

    def eval_prompts(self, n: int, length: int) -> list[list[int]]:
        """The held-back rows' prompts (what precedes their first target), at most `length` tokens."""
        tokens, mask = self.heldout
        starts = [int(np.argmax(m)) if m.any() else len(m) for m in mask]
        return [t[max(0, s - length):s].tolist() for t, s in zip(tokens[:n], starts) if s > 0]
