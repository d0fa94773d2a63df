"""Static draft trees: where each candidate sits, and the mask and positions of a tree pass.

A tree round runs [root, candidate nodes, look-ahead blocks] through the model in one pass. The
root is the pending token (the last exact token, not yet in the cache). Node i has parent
parents[i] < i and depth = its RoPE offset from the root (a chain is parents[i] = i - 1). A node
sees the committed cache, its ancestors and itself. A look-ahead block of k slots attached to node
a sits at depths depth[a] + 1 .. depth[a] + k and sees a's ancestors, a and its own earlier slots:
its outputs draft the tokens after a's successor, so whatever path is accepted, the next round has
drafts without a drafting pass.

Candidates come from two sources, fixed in shape and filled per row at run time:
- look-ahead: a node is a tuple of ranks (r_1..r_d): the r_d-th most likely token of look-ahead
  position d, child of node (r_1..r_{d-1}) (Medusa's notation);
- context n-grams: a chain of `ngram` tokens that followed the last occurrence of the row's
  current suffix in its prompt + output (prompt lookup), hanging from the root.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np


@dataclasses.dataclass(frozen=True)
class DraftTree:
    """A static tree shape: look-ahead rank paths, an n-gram chain, and which nodes carry blocks."""

    paths: tuple[tuple[int, ...], ...] = ()
    ngram: int = 0  # length of the n-gram chain (0 = no n-gram drafts)
    ngram_n: int = 3  # longest suffix of the context that prompt lookup matches
    la_blocks: int | None = None  # look-ahead blocks on the first n nodes (None = every node)
    ngram_min: int = 1  # shortest matched suffix worth drafting; rounds where no row has one skip the chain

    def __post_init__(self):
        seen = {()}
        for p in self.paths:
            if not p or any(not isinstance(r, int) or r < 0 for r in p):
                raise ValueError(f"tree path {p!r} must be a non-empty tuple of ranks >= 0")
            if p[:-1] not in seen:
                raise ValueError(f"tree path {p!r} comes before its parent {p[:-1]!r}")
            if p in seen:
                raise ValueError(f"tree path {p!r} appears twice")
            seen.add(p)
        if self.ngram < 0 or not 1 <= self.ngram_min <= self.ngram_n:
            raise ValueError(f"need ngram >= 0 and 1 <= ngram_min <= ngram_n, got {self.ngram}, {self.ngram_min}, "
                             f"{self.ngram_n}")
        if self.la_blocks is not None and self.la_blocks < 0:
            raise ValueError(f"la_blocks must be >= 0 or None, got {self.la_blocks}")

    @classmethod
    def from_widths(cls, widths, ngram: int = 0, ngram_n: int = 3, la_blocks: int | None = None,
                    ngram_min: int = 1) -> DraftTree:
        """widths[d]: candidates at depth d+1, all children of the best candidate at depth d (a spine with ribs)."""
        widths = tuple(int(w) for w in widths)
        if any(w < 1 for w in widths):
            raise ValueError(f"tree widths must be >= 1, got {widths}")
        paths = [(0,) * d + (r,) for d, w in enumerate(widths) for r in range(w)]
        paths.sort(key=lambda p: (sum(p), len(p)))  # likeliest path ends first: they get blocks first
        return cls(tuple(paths), ngram, ngram_n, la_blocks, ngram_min)

    @classmethod
    def parse(cls, text: str) -> DraftTree:
        """'4,2,1' (look-ahead widths), 'ngram=4', or both: '4,2,1;ngram=4;blocks=3'. '' or 'none': no candidates."""
        widths, kw = (), {}
        for part in filter(None, (s.strip() for s in re.split(r"[;+ ]", text))):
            if part == "none":
                continue
            key, eq, val = part.partition("=")
            try:
                if not eq:
                    widths = tuple(int(w) for w in part.split(","))
                elif key in ("ngram", "ngram_n", "ngram_min", "blocks"):
                    kw["la_blocks" if key == "blocks" else key] = int(val)
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(f"cannot read tree {text!r}: use look-ahead widths like '4,2,1', optionally "
                                 "followed by ';ngram=M', ';ngram_n=N', ';ngram_min=N' and ';blocks=B'") from None
        return cls.from_widths(widths, **kw)

    def describe(self) -> str:
        widths = [sum(1 for p in self.paths if len(p) == d) for d in range(1, self.la_depth + 1)]
        return ";".join([",".join(map(str, widths)) or "none", f"ngram={self.ngram}"]
                        + ([f"ngram_n={self.ngram_n}"] if self.ngram_n != 3 else [])
                        + ([f"ngram_min={self.ngram_min}"] if self.ngram_min != 1 else [])
                        + ([f"blocks={self.la_blocks}"] if self.la_blocks is not None else []))

    def without_ngram(self) -> DraftTree:
        """The same tree without its n-gram chain: for rounds where no row found a match worth drafting."""
        return dataclasses.replace(self, ngram=0, ngram_min=1)

    # ---- static layout ---------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return 1 + len(self.paths) + self.ngram

    @property
    def la_depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    @property
    def max_depth(self) -> int:
        return max(self.la_depth, self.ngram)

    @property
    def max_rank(self) -> int:
        return 1 + max((p[-1] for p in self.paths), default=0)

    def slots_used(self, k: int) -> int:
        """Look-ahead slots a round can read. With a block on every node the accepted path always ends
        at a block and reads slots 1..la_depth; otherwise a shifted ancestor's block may read deeper.
        Look-ahead i sees only look-aheads 1..i, so the rest can be dropped without changing a draft."""
        if self.la_blocks is None or self.la_blocks >= self.num_nodes:
            return min(k, self.la_depth)
        return min(k, self.la_depth + self.max_depth)

    def num_blocks(self, k: int) -> int:
        if k == 0:
            return 0
        return self.num_nodes if self.la_blocks is None else min(self.la_blocks, self.num_nodes)

    def num_tokens(self, k: int) -> int:
        """Tokens in one tree pass: the nodes plus k slots per look-ahead block."""
        return self.num_nodes + self.num_blocks(k) * k

    @functools.cached_property
    def parents(self) -> np.ndarray:
        index = {(): 0, **{p: 1 + i for i, p in enumerate(self.paths)}}
        la = [index[p[:-1]] for p in self.paths]
        first = 1 + len(self.paths)
        ng = [0 if t == 0 else first + t - 1 for t in range(self.ngram)]
        return np.array([0] + la + ng, np.int32)

    @functools.cached_property
    def depth(self) -> np.ndarray:
        return np.array([0] + [len(p) for p in self.paths] + list(range(1, self.ngram + 1)), np.int32)

    @functools.cached_property
    def ancestors(self) -> np.ndarray:
        """[N, N] bool: anc[i, j] = node j is node i or one of its ancestors."""
        n = self.num_nodes
        anc = np.eye(n, dtype=bool)
        for i in range(1, n):
            anc[i] |= anc[self.parents[i]]
        return anc

    def layout(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(depth offsets [T], block mask [T, T]) of a tree pass: nodes first, then the blocks in node order."""
        n, nb = self.num_nodes, self.num_blocks(k)
        t = self.num_tokens(k)
        offsets = np.concatenate([self.depth] + [self.depth[a] + 1 + np.arange(k) for a in range(nb)]).astype(np.int32)
        mask = np.zeros((t, t), bool)
        mask[:n, :n] = self.ancestors
        for a in range(nb):
            s = n + a * k
            mask[s:s + k, :n] = self.ancestors[a]
            mask[s:s + k, s:s + k] = np.tril(np.ones((k, k), bool))
        return offsets, mask
