"""Adaptive drafting: each round, the part of the plan's tree that is expected to emit the most tokens
per unit of pass cost on this machine, chosen under jit among a few static options by `lax.switch`.

Options, from the plan's tree: an autoregressive step (1 token a row, no drafts), the n-gram chain
alone, the tree without its n-gram chain, the whole tree. A round's expected tokens: one exact token
per live row, plus the drafts it is expected to get accepted: `g_la` for a row verifying look-ahead
candidates alone, `g_ng` for a row whose context matched an n-gram (this round's prompt lookup) verifying
the chain alone, `g_full` for a matched row verifying both, each the running mean of what such rows got
accepted so far in this decode (from a prior worth PRIOR_ROWS row-rounds). Costs are the plan's measured pass costs per option (decoding.costs), relative to the
cheapest. Where drafting does not pay for the rows it adds (a CPU at batch 8), the rounds are
autoregressive steps; where a pass costs about one row's (an accelerator), the whole tree runs.

The look-ahead's drafts are the steady state: a round without blocks leaves the next round no
look-ahead candidates, so the tree options are weighed by what they earn once drafting runs. Until
EXPLORE_ROWS look-ahead rows have been verified the rounds take the best tree option, so that the
look-ahead's mean is measured, not assumed (unless even a look-ahead that is always right could not
pay: then no round is spent on it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .ngram import tree_ngram_candidates
from .rounds import _tree_round
from .spec import DecodePlan, DecodeState, Inputs
from .tree import DraftTree

PRIOR_GAINS = np.array([0.5, 1.0, 1.2], np.float32)  # accepted drafts per row-round: look-ahead, n-gram, both
PRIOR_ROWS = 4.0
EXPLORE_ROWS = 8  # look-ahead rows verified before the look-ahead's mean is trusted (until then: a tree option)


@dataclasses.dataclass(frozen=True)
class Option:
    """One round shape: its tree, what it drafts, and where its nodes sit in the plan's full tree."""

    name: str
    tree: DraftTree
    ngram: bool  # verifies the n-gram chain
    lookahead: bool  # verifies look-ahead candidates and carries blocks (the next round's drafts)
    node_index: tuple[int, ...]


def options(tree: DraftTree, lookahead: bool) -> tuple[Option, ...]:
    """The round shapes a tree plan chooses from, cheapest first (ties go to the cheaper)."""
    chain = tuple(1 + len(tree.paths) + t for t in range(tree.ngram))
    out = [Option("ar", DraftTree(la_blocks=0), False, False, (0,))]
    if tree.ngram:
        out.append(Option("ngram", DraftTree(ngram=tree.ngram, ngram_n=tree.ngram_n, la_blocks=0), True, False,
                          (0, *chain)))
    if lookahead and tree.paths:
        base = tree.without_ngram()
        out.append(Option("tree", base, False, True, tuple(range(base.num_nodes))))
        if tree.ngram:
            out.append(Option("full", tree, True, True, tuple(range(tree.num_nodes))))
    return tuple(out)


def option_tokens(tree: DraftTree, lookahead: bool, k: int) -> tuple[int, ...]:
    """Tokens a row puts through the model in each option's pass (what its cost is measured at)."""
    return tuple(o.tree.num_tokens(k if o.lookahead else 0) for o in options(tree, lookahead))


def expected_tokens(opts, live, ngram_rows, gains, gain_rows):
    """[options] tokens each option is expected to emit this round (see the module docstring); a tree
    option is weighed as if every live row held look-ahead drafts (the steady state)."""
    g_la, g_ng, g_full = jnp.unstack((gains + PRIOR_GAINS * PRIOR_ROWS) / (gain_rows + PRIOR_ROWS))
    n_live, n_ng = live.sum().astype(jnp.float32), ngram_rows.sum().astype(jnp.float32)
    out = []
    for o in opts:
        if o.lookahead and o.ngram:
            out.append(n_live + g_la * (n_live - n_ng) + g_full * n_ng)
        elif o.lookahead:
            out.append(n_live * (1 + g_la))
        elif o.ngram:
            out.append(n_live + g_ng * n_ng)
        else:
            out.append(n_live)
    return jnp.stack(out)


def worth_exploring(opts, pass_costs, la_depth: int) -> bool:
    """Whether the look-ahead could pay at all: a tree round accepting every look-ahead candidate
    (la_depth drafts a row) beats an autoregressive step. Where it cannot (a CPU at a large batch) no
    round is spent measuring it."""
    return any(o.lookahead and (1 + la_depth) / c > 1 / pass_costs[0] for o, c in zip(opts, pass_costs))


def adaptive_round(plan: DecodePlan, inp: Inputs, st: DecodeState) -> DecodeState:
    """One round of the option with the most expected tokens per cost; its outcome updates the means."""
    tree = plan.spec.tree
    opts = options(tree, plan.spec.method.lookahead)
    live = ~st.done
    ngram = None
    has_ngram = jnp.zeros_like(live)
    if tree.ngram:
        tokens, valid = tree_ngram_candidates(tree, inp.prompts, inp.prompt_lens, st.out, st.out_len)
        ngram, has_ngram = (tokens, valid), valid[:, 0] & live
    la_rows = (st.n_drafts > 0) & live
    expected = expected_tokens(opts, live, has_ngram, st.gains, st.gain_rows)
    rate = expected / jnp.asarray(plan.pass_costs, jnp.float32)
    with_la = np.asarray([o.lookahead for o in opts])
    if worth_exploring(opts, plan.pass_costs, tree.la_depth):  # the look-ahead options until its mean is measured
        rate = jnp.where(with_la | (st.gain_rows[0] >= EXPLORE_ROWS), rate, -1.0)
    choice = jnp.argmax(rate)

    def branch(o: Option):
        def run(s):
            s = _tree_round(plan, inp, s, o.tree, ngram if o.ngram else None, np.asarray(o.node_index))
            return s if o.lookahead else s.replace(n_drafts=jnp.zeros_like(s.n_drafts))  # no blocks: no drafts
        return run

    new = jax.lax.switch(choice, [branch(o) for o in opts], st)
    accepted = jnp.maximum(new.out_len - st.out_len - 1, 0).astype(jnp.float32)
    drafts_ngram = jnp.asarray([o.ngram for o in opts])[choice] & has_ngram
    drafts_la = jnp.asarray(with_la)[choice] & la_rows
    counted = jnp.stack([drafts_la & ~drafts_ngram, drafts_ngram & ~drafts_la, drafts_ngram & drafts_la])  # [3, B]
    return new.replace(
        gains=new.gains + jnp.sum(counted * accepted[None], 1),
        gain_rows=new.gain_rows + jnp.sum(counted, 1).astype(jnp.float32),
        choices=new.choices.at[choice].add(1),
        ngram_rows=None if new.ngram_rows is None else new.ngram_rows + drafts_ngram.sum(),
    )
