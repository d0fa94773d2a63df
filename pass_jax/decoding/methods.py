"""The decoding methods, one class each: what its prefill sets up and what one round does. The loop they
share is `DraftMethod.decode`: a prefill, then one `lax.while_loop` of rounds until every row is done.

Autoregressive = a round with no drafts and no look-ahead. PaSS "paper" = alternating validation
rounds (drafts only) and drafting rounds (look-ahead only; the prefill is the first); PaSS "fused" =
drafts and look-ahead in one round, the look-ahead drafts valid only where every draft was accepted;
PaSS "tree" = a tree of look-ahead and n-gram candidates per round; "ngram" = the tree round with
n-gram candidates alone (prompt lookup); two-model "speculative" = a draft model's k proposals, then a
validation round. `METHODS` is the registry the API and the CLI read their choices from.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .adaptive import adaptive_round
from .ngram import tree_ngram_candidates
from .rounds import _draft_with_model, _prefill, _prefill_draft_model, _round, _tree_round
from .spec import DecodePlan, DecodeSpec, DecodeState, Inputs


@dataclasses.dataclass(frozen=True)
class DraftMethod:
    """Autoregressive decoding, and the base of every method. Instances are static (in the plan's jit key)."""

    name = "ar"
    lookahead = False  # the prefill appends a look-ahead block; rounds read look-ahead outputs
    tree = False  # deterministic candidates verified as a tree (spec.tree)
    chain_drafts = False  # sampled chain drafts, whose distributions the verification reads
    uses_k = False  # drafts k tokens ahead (look-ahead positions, or a draft model's proposals)

    def block_tokens(self, spec: DecodeSpec) -> int:
        """Largest block a round writes into the cache past the committed entries."""
        return 1

    def prefill(self, plan: DecodePlan, inp: Inputs) -> DecodeState:
        return _prefill(plan, inp)

    def round(self, plan: DecodePlan, inp: Inputs, st: DecodeState) -> DecodeState:
        return _round(plan, inp, st, use_drafts=False, use_la=False)

    def decode(self, plan: DecodePlan, inp: Inputs) -> DecodeState:
        """The whole decode: the prefill, then rounds until every row met EOS or its budget."""
        return jax.lax.while_loop(lambda st: ~jnp.all(st.done), lambda st: plan.pin(self.round(plan, inp, st)),
                                  plan.pin(self.prefill(plan, inp)))


@dataclasses.dataclass(frozen=True)
class PassTree(DraftMethod):
    name = "pass/tree"
    lookahead = tree = uses_k = True

    def block_tokens(self, spec):
        return spec.tree.num_tokens(spec.k)

    def round(self, plan, inp, st):
        """A tree round; the n-gram chain rides along only when some live row found a match worth drafting
        (ngram_min tokens or more), so rounds without one cost what the rest of the tree costs (for
        method "ngram": an autoregressive step)."""
        tree = plan.spec.tree
        if plan.pass_costs is not None:
            return adaptive_round(plan, inp, st)
        if not tree.ngram:
            return _tree_round(plan, inp, st, tree)
        tokens, valid = tree_ngram_candidates(tree, inp.prompts, inp.prompt_lens, st.out, st.out_len)
        st = st.replace(ngram_rows=st.ngram_rows + jnp.sum(valid[:, 0] & ~st.done))
        if tree.ngram_min == 1:  # every match is drafted: always the full tree
            return _tree_round(plan, inp, st, tree, (tokens, valid))
        return jax.lax.cond(jnp.any(valid[:, 0] & ~st.done),
                            lambda s: _tree_round(plan, inp, s, tree, (tokens, valid)),
                            lambda s: _tree_round(plan, inp, s, tree.without_ngram()), st)


@dataclasses.dataclass(frozen=True)
class Ngram(PassTree):
    name = "ngram"
    lookahead = uses_k = False

    def block_tokens(self, spec):
        return spec.tree.num_tokens(0)


@dataclasses.dataclass(frozen=True)
class PassFused(DraftMethod):
    name = "pass/fused"
    lookahead = chain_drafts = uses_k = True

    def block_tokens(self, spec):
        return 1 + 2 * spec.k

    def round(self, plan, inp, st):
        """Validate and draft in one pass; skip the draft slots when no live row holds drafts."""
        return jax.lax.cond(jnp.any((st.n_drafts > 0) & ~st.done), lambda s: _round(plan, inp, s, True, True),
                            lambda s: _round(plan, inp, s, False, True), st)


@dataclasses.dataclass(frozen=True)
class PassPaper(PassFused):
    name = "pass/paper"

    def round(self, plan, inp, st):
        """The previous pass drafted: validate, then draft unless every row is done."""
        st = _round(plan, inp, st, use_drafts=True, use_la=False)
        return jax.lax.cond(jnp.all(st.done), lambda s: s, lambda s: _round(plan, inp, s, False, True), st)


@dataclasses.dataclass(frozen=True)
class Speculative(DraftMethod):
    name = "speculative"
    chain_drafts = uses_k = True

    def block_tokens(self, spec):
        return 1 + spec.k

    def prefill(self, plan, inp):
        return _prefill_draft_model(plan, inp, _prefill(plan, inp))

    def round(self, plan, inp, st):
        st = _round(plan, inp, _draft_with_model(plan, inp, st), use_drafts=True, use_la=False)
        return st.replace(draft_cache=st.draft_cache.replace(lengths=st.cache.lengths))


METHODS: dict[str, DraftMethod] = {m.name: m for m in (DraftMethod(), PassTree(), PassFused(), PassPaper(), Ngram(),
                                                       Speculative())}
METHOD_NAMES = tuple(dict.fromkeys(name.split("/")[0] for name in METHODS))  # ar, pass, ngram, speculative
VARIANTS = tuple(name.split("/")[1] for name in METHODS if name.startswith("pass/"))  # PaSS's: tree, fused, paper


def find(name: str, variant: str = "tree") -> DraftMethod:
    """The registry's method for a CLI / API name ("pass" takes a variant), or one clear error."""
    if name not in METHOD_NAMES:
        raise ValueError(f"method must be one of {', '.join(METHOD_NAMES)}, got {name!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    return METHODS[f"pass/{variant}" if name == "pass" else name]
