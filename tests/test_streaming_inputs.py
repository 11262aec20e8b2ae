"""Inputs that are not native files stream too: a merge of the authors' ``delta.bin`` /
``delta.ckpt`` files or diffusers training folders holds about one layer of each input at a
time, as a merge of native files does, instead of every input whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mergekit_cd.base import open_base
from mergekit_cd.loading import save
from mergekit_cd.testing import random_concept_deltas

#: Long scenarios: ``pytest -m "not slow"`` leaves them out of a quick local run; ``make test`` runs them.
pytestmark = pytest.mark.slow

FORMATS = {"native": "{i}.safetensors", "authors-bin": "{i}.bin", "compvis": "{i}.ckpt", "diffusers": "{i}"}

# One interpreter measures every format in turn: the peak is reset before each (Linux's
# clear_refs), and glibc's malloc returns every large block to the system when freed (a fixed
# mmap threshold), so what one merge freed does not hide what the next one needs.
MEMORY_SCRIPT = textwrap.dedent("""
    import gc, json, sys, warnings
    from mergekit_cd.base import open_base
    from mergekit_cd.captions import default_reg_captions
    from mergekit_cd.merge import merge, plan_merge

    def peak():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))

    base, inputs = open_base(sys.argv[1]), json.loads(sys.argv[2])
    captions, words = default_reg_captions()[:20], ["cat", "dog", "pot"]
    warnings.simplefilter("ignore")
    merge(inputs["native"], captions, base=base, class_words=words)  # load lazy parts, fill the caption cache
    result = {}
    for fmt, paths in inputs.items():
        estimate = plan_merge(paths, captions, base=base, class_words=words).estimated_memory_bytes(12)
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # the peak is now the current size
        except OSError:
            print(json.dumps(None))
            sys.exit(0)
        before = peak()
        merge(paths, captions, base=base, class_words=words)  # reads the inputs, then merges
        result[fmt] = (peak() - before, estimate)
    print(json.dumps(result))
""")


@pytest.fixture(scope="module")
def growth(tall_base_path, tmp_path_factory) -> dict:
    """format -> (peak memory growth of reading and merging 3 inputs, the plan's estimate), on a
    base with tall K/V layers (3000 rows: 17 MB of K/V, the rest next to nothing); and "kv" ->
    the bytes of the base's K/V weights."""
    if not sys.platform.startswith("linux"):
        pytest.skip("measures the peak through /proc")
    folder = tmp_path_factory.mktemp("streaming")
    base_path = tall_base_path
    base = open_base(base_path)
    deltas = random_concept_deltas(base, [("<new1>", "cat"), ("<new2>", "dog"), ("<new3>", "pot")], seed=1)
    inputs = {fmt: [str(save(delta, folder / fmt / name.format(i=i), format=fmt, base=base))
                    for i, delta in enumerate(deltas)]
              for fmt, name in FORMATS.items() if (folder / fmt).mkdir() is None}
    env = {**os.environ, "MERGEKIT_CD_CACHE": str(folder / "gram-cache"), "MALLOC_MMAP_THRESHOLD_": "65536",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(base_path), json.dumps(inputs)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.splitlines()[-1])
    if measured is None:
        pytest.skip("cannot reset the peak memory of a process here (/proc/self/clear_refs)")
    return {**measured, "kv": 4 * sum(k.numel() + v.numel() for k, v in base.kv_shapes().values()), "inputs": inputs}


@pytest.mark.parametrize("fmt", ["authors-bin", "compvis", "diffusers"])
def test_full_weight_inputs_are_held_a_layer_at_a_time_like_native_ones(growth, fmt):
    """Read whole, 3 inputs took 3 x K/V as full weights and again as differences; streamed, they
    add next to nothing to what a merge of native files needs (the result, 1 x K/V, and one
    layer's rows). A pickle is mapped once and its layers copied out of the mapping; the pages
    validation read, and each layer's once copied, are handed back, so the mapping does not hold
    the file (it held 48 MB for three inputs of 17 MB, and a merge of 100 authors' files all
    7 GiB of them); safetensors inputs are read a tensor at a time into memory of their own."""
    native, native_estimate = growth["native"]
    grown, estimate = growth[fmt]
    assert native < 2.5 * growth["kv"] + 32 * 2**20, native  # as test_merge_plan bounds it
    assert grown < native + growth["kv"] / 2, (fmt, grown / 2**20, native / 2**20, growth["kv"] / 2**20)
    # the plan's estimate counts inputs read per layer as nothing held, as it does native ones
    assert estimate == native_estimate
