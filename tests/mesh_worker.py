"""Run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS must be set
before jax starts): generate on one device and on 8x1, 2x4 and 1x8 meshes, print JSON.

usage: python -m tests.mesh_worker MODEL_DIR  (the model saved by the test)
"""

import json
import sys
import time

import jax
import numpy as np

import pass_jax as pj
from pass_jax.io import hf
from pass_jax.sharding import make_mesh

MESHES = [(8, 1), (2, 4), (1, 8)]
GREEDY = {"ar": {}, "pass_tree": {"method": "pass", "variant": "tree", "k": 2, "tree": "3,1;ngram=3"}}
SAMPLED = {"temperature": 0.8, "top_k": 10, "seed": 3}
EOS = 41  # a token that stops some rows mid-way on the test's model (the test checks that it does)


def prompts(vocab: int) -> list[list[int]]:
    """Batch 8, lengths 3..10, each ending with a repeat of its start (n-gram drafts get accepted)."""
    rng = np.random.default_rng(0)
    out = []
    for n in range(8):
        p = rng.integers(0, vocab, 3 + n // 2).tolist()
        out.append(p + p[:3] if n % 2 else p)
    return out


def main(model_dir: str) -> None:
    base = pj.load_model(model_dir)
    ids = prompts(base.config.vocab_size)
    la = np.asarray(pj.init_lookahead(base.params, 2, "random", key=jax.random.key(1)))
    common = {"max_new_tokens": 16, "eos_token_id": EOS, "pass_costs": None}  # the whole tree: meshes' own test

    def run(model, kw, mesh=None):
        kw = {**common, **kw}
        if kw.get("method") == "pass":
            kw["lookahead"] = la
        t0 = time.perf_counter()
        res = pj.generate(model, ids, mesh=mesh, **kw)
        print(f"{kw.get('method', 'ar')} {kw.get('variant', '')} {mesh and dict(mesh.shape)}: "
              f"{time.perf_counter() - t0:.1f} s (compile {res.stats.compile_seconds:.1f} s)", file=sys.stderr)
        return {"token_ids": res.token_ids, "row_forward_passes": res.stats.row_forward_passes}

    # compiling dominates the time: AR and the default tree on every mesh, the other methods on one
    cases = {name: (kw, MESHES) for name, kw in GREEDY.items()}
    cases["pass_tree_sampled"] = ({**GREEDY["pass_tree"], **SAMPLED}, [(2, 4)])
    cases["pass_fused"] = ({"method": "pass", "variant": "fused", "k": 2}, [(2, 4)])
    cases["pass_paper"] = ({"method": "pass", "variant": "paper", "k": 2}, [(2, 4)])  # the other methods: one mesh
    cases["ngram"] = ({"method": "ngram", "tree": "ngram=3;ngram_min=2"}, [(2, 4)])
    cases["ar_sampled"] = (SAMPLED, [(2, 4)])
    reads = []
    real_read = hf.SliceReader.read

    def counting_read(self, name, index):
        out = real_read(self, name, index)
        reads.append((name, list(out.shape)))
        return out

    result = {"prompts": ids, "cases": {}}
    for shape in MESHES:
        mesh = make_mesh(*shape)
        hf.SliceReader.read = counting_read
        reads.clear()
        model = pj.load_model(model_dir, mesh=mesh)
        hf.SliceReader.read = real_read
        if shape == (2, 4):
            try:
                pj.generate(model, ids[:3], mesh=mesh, **common)
            except ValueError as e:
                result["indivisible_error"] = str(e)
            result["reads_2x4"] = list(reads)
            result["loaded_equal"] = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                                         zip(jax.tree.leaves(model.params), jax.tree.leaves(base.params)))
            result["shardings_2x4"] = {"qkv": str(model.params["layers"][0]["qkv"].sharding.spec),
                                       "down": str(model.params["layers"][0]["down"].sharding.spec),
                                       "embed": str(model.params["embed"].sharding.spec)}
        for name, (kw, meshes) in cases.items():
            if shape in meshes:
                case = result["cases"].setdefault(name, {"one_device": run(base, kw)})
                case["x".join(map(str, shape))] = run(model, kw, mesh)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
