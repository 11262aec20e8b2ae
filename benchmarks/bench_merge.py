"""cd-merge end to end at full size (random weights, real shapes) against the authors' way.

Scenarios, each job in a fresh process; wall time and peak RSS come from the OS (``wait4``):

- ``sd15``: 3 SD1.5-size concepts (the authors' ``delta.bin``, full K/V weights) with 200 and
  1000 captions: cd-merge cold (empty Gram cache), cd-merge with the cached Gram matrix, and
  the baseline.
- ``sdxl``: 10 SDXL-size concepts (native files, 1.36 GB each): cd-merge cold and cached; its
  peak memory against the size of the inputs. No baseline: the authors' script is SD1-only.
- ``many``: 100 SD1.5-size concepts, cd-merge against the baseline.

The baseline follows the authors' merge scripts: load the whole pipeline, load every delta file
whole, encode each caption on its own without padding, and solve layer by layer in float32
with an explicit inverse of M (``torch.linalg.inv``). It is kinder than their scripts
in one way: G = C_reg^T C_reg and the UNet's state dict are computed once, where both scripts
recompute them (and a loss over every caption row) for every layer. Their text encoder ran in
fp16 on a GPU; on the CPU it runs in float32 here, as ours does.

The tiny byte-level tokenizer of :mod:`mergekit_cd.testing` splits a caption into about 28
tokens, where CLIP's would give about 12: the text encoders of both see about 2.4 times the
rows real captions give.

The SDXL base holds only what a merge reads (text encoders at full size, the UNet's K/V tensors
under their real names): a full random SDXL UNet would be 10 GB nobody reads. The SD1.5 base is
a complete pipeline, so that the baseline can load it whole.

Each scenario also runs the floor of a merge (``job_floor``): the imports it needs, every input
byte read once, the captions encoded in one batched pass (cold only), one factorisation and one
pass of the layers through it, the output written; the table gives ours against it.

Run: ``python benchmarks/bench_merge.py [--only sd15 sdxl many] [--quick] [--tiny]`` (builds its
models once under ``--work``, ~30 GB of disk; about 30 minutes on 2 CPU cores). Prints ratios
measured in one run, by wall time and by CPU time (user + system: what a shared machine does not
distort). ``--tiny`` runs the same scenarios on the test suite's tiny models: the script end to
end in a minute, its figures meaningless (the test suite runs ``--quick --tiny``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLASS_WORDS = ("cat", "dog", "pot", "chair", "car", "tree", "house", "flower", "guitar", "watch")


DEFAULT_CAPTIONS = [200, 1000]  # the sd15 scenario's caption counts
SCENARIOS = {"sd15": ("sd15", 3, "authors-bin"), "many": ("sd15", 100, "authors-bin"), "sdxl": ("sdxl", 10, "native")}


def paths(work: Path, scenario: str, size: str = "full") -> tuple[Path, list[Path]]:
    """The base folder and the concept files of a scenario at ``size`` (full or tiny)."""
    kind, count, file_format = SCENARIOS[scenario]
    suffix = "delta.bin" if file_format == "authors-bin" else "delta.safetensors"
    tag = "" if size == "full" else f"-{size}"
    return work / f"base-{kind}{tag}", [work / f"{scenario}{tag}-concepts" / f"{i:03d}" / suffix for i in range(count)]


def job_build(work: str, scenario: str, size: str = "full") -> None:
    """Make what :func:`paths` names and is missing; a job of its own, so that the measuring
    process stays small (a child's peak RSS, as the OS reports it, counts its parent's memory
    at the fork)."""
    from mergekit_cd.base import open_base
    from mergekit_cd.loading import save
    from mergekit_cd.testing import random_concept_deltas, save_full_size_base, save_tiny_pipeline

    kind, _, file_format = SCENARIOS[scenario]
    base_dir, files = paths(Path(work), scenario, size)
    if not (base_dir / "model_index.json").is_file():
        shutil.rmtree(base_dir, ignore_errors=True)
        print(f"building the {size} {kind} base in {base_dir} ...", flush=True)
        if size == "tiny":
            save_tiny_pipeline("sd1" if kind == "sd15" else kind, base_dir)
        else:
            save_full_size_base(kind, base_dir, full_unet=kind == "sd15")
    missing = [i for i, f in enumerate(files) if not f.is_file()]
    if missing:
        print(f"making {len(missing)} {kind} concepts ...", flush=True)
        base = open_base(base_dir)
        per_batch = 2 if kind == "sdxl" else 10  # an SDXL concept is 1.36 GB in memory
        for start in range(0, len(missing), per_batch):
            chunk = missing[start:start + per_batch]
            specs = [(f"<new{i + 1}>", CLASS_WORDS[i % len(CLASS_WORDS)]) for i in chunk]
            for i, delta in zip(chunk, random_concept_deltas(base, specs, seed=1000 + chunk[0])):
                files[i].parent.mkdir(parents=True, exist_ok=True)
                save(delta, files[i], format=file_format, base=base, force=True)


# ----------------------------------------------------------------------------- jobs (run in a child)


def job_ours(base: str, output: str, cache: str, captions: str, *inputs: str) -> None:
    from mergekit_cd.cli.merge import main

    words = [CLASS_WORDS[i % len(CLASS_WORDS)] for i in range(len(inputs))]
    classes = [arg for word in words for arg in ("--class", word)]
    code = main([*inputs, "-o", output, "--base", base, "--num-reg-captions", captions,
                 "--cache-dir", cache, "--force", "-q", *classes])
    if code:
        raise SystemExit(code)


def job_baseline(base: str, output: str, captions: str, *inputs: str) -> None:
    """The authors' merge, step by step (see the module docstring)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from mergekit_cd.captions import default_reg_captions

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_solvers import baseline_layer

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder.eval()
    deltas = [torch.load(path, map_location="cpu", weights_only=True) for path in inputs]
    tokens = [f"<new{i + 1}>" for i in range(len(deltas))]
    tokenizer.add_tokens(tokens)
    encoder.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():
        for token, delta in zip(tokens, deltas):
            embedding = next(iter(delta["modifier_token"].values()))
            encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)] = embedding

    def encode(caption: str) -> torch.Tensor:
        ids = tokenizer(caption, truncation=True, return_tensors="pt").input_ids  # alone, unpadded
        with torch.no_grad():
            states = encoder(ids)[0][0]
        return states[(4 if "photo of a" in caption[:15] else 1):]

    C_reg = torch.cat([encode(c) for c in default_reg_captions()[:int(captions)]])
    G = C_reg.T @ C_reg
    targets = [torch.cat([encode(f"{t} {w}"), encode(f"photo of a {t} {w}")])
               for t, w in zip(tokens, (CLASS_WORDS[i % len(CLASS_WORDS)] for i in range(len(deltas))))]
    C = torch.cat(targets)
    unet = pipe.unet.state_dict()
    merged, worst = {}, 0.0
    for key in deltas[0]["unet"]:
        W0 = unet[key]
        V = torch.cat([delta["unet"][key] @ Ci.T for delta, Ci in zip(deltas, targets)], dim=1)
        W = baseline_layer(W0, G, C, V)
        worst = max(worst, float((W.double() @ C.T.double() - V.double()).norm() / V.double().norm()))
        merged[key] = W
    torch.save({"unet": merged, "modifier_token": {t: next(iter(d["modifier_token"].values()))
                                                   for t, d in zip(tokens, deltas)}}, output)
    print(json.dumps({"residual": worst}))


def job_floor(base: str, output: str, captions: str, cold: str, *inputs: str) -> None:
    """The floor of a merge on this machine: the imports it needs, every input byte read once, the
    captions and target prompts encoded in one batched pass (``cold`` = "1" only), one
    factorisation and one pass of the base's layers through it, the output written. The cold run
    keeps its Gram matrix beside ``output`` for the cached run, which reads it as a merge reads
    its cache."""
    import torch
    from safetensors.torch import load_file, save_file

    from mergekit_cd.base import open_base
    from mergekit_cd.captions import default_reg_captions
    from mergekit_cd.solvers import factor_hard

    gram_file = str(Path(output).with_suffix(".gram.safetensors"))
    for path in inputs:  # read once, nothing parsed
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass
    model = open_base(base)
    width = model.context_dim
    rows = 12 * len(inputs)  # the target rows of two prompts per concept
    if cold == "1":
        from transformers import AutoTokenizer, CLIPTextModel

        texts = default_reg_captions()[:int(captions)] + [f"photo of a <new{i}> cat" for i in range(len(inputs))]
        per_encoder = []  # SDXL: both encoders' rows side by side, as the UNet reads them
        for folder in [name for name in ("text_encoder", "text_encoder_2") if (Path(base) / name).is_dir()]:
            tokenizer = AutoTokenizer.from_pretrained(base, subfolder=folder.replace("text_encoder", "tokenizer"))
            encoder = CLIPTextModel.from_pretrained(base, subfolder=folder).eval()
            with torch.no_grad():
                per_encoder.append(torch.cat([
                    encoder(tokenizer(texts[start:start + 64], padding=True, return_tensors="pt").input_ids)
                    .last_hidden_state.flatten(0, 1) for start in range(0, len(texts), 64)]))
        count = min(len(features) for features in per_encoder)
        C_reg = torch.cat([features[:count] for features in per_encoder], dim=1).double()
        G = C_reg.T @ C_reg
        save_file({"gram": G}, gram_file)
    else:  # a cached Gram matrix: no text encoder, no product
        if not Path(gram_file).is_file():
            raise SystemExit(f"{gram_file}: no Gram matrix from a cold floor run; run the cold one first")
        G = load_file(gram_file)["gram"]
    generator = torch.Generator().manual_seed(0)
    C = torch.randn(rows, width, generator=generator, dtype=torch.float64)
    operator = factor_hard(G, C, ridge=1e-3)
    merged = {}
    for name in model.layer_names():
        W0 = torch.cat(model.kv(name)).double()
        V = torch.randn(W0.shape[0], rows, generator=generator, dtype=torch.float64)
        merged[name] = operator.apply(W0, V, difference=True, dtype=torch.float32)  # as cd-merge does
    save_file(merged, output)


def job_difference(base: str, ours: str, theirs: str) -> None:
    """:func:`difference` of two merged files, printed as JSON (see :func:`in_child_difference`)."""
    print(json.dumps({"difference": difference(Path(base), ours, theirs)}))


JOBS = {"ours": job_ours, "baseline": job_baseline, "floor": job_floor, "build": job_build,
        "difference": job_difference}


# ----------------------------------------------------------------------------- measuring


def measure(job: str, *args: str) -> dict:
    """Run one job in a fresh interpreter; its wall time, CPU time (user + system) and peak RSS
    (GiB), and what it printed."""
    command = [sys.executable, __file__, "--job", job, *args]
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - start
        stdout.seek(0), stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{job} failed:\n{out}\n{err[-3000:]}")
    residual = next((json.loads(line)["residual"] for line in out.splitlines() if line.startswith("{")), None)
    return {"seconds": elapsed, "cpu": usage.ru_utime + usage.ru_stime, "peak_gib": usage.ru_maxrss / 2**20,
            "residual": residual, "log": out}


def ours_residual(log: str) -> float:
    """Worst per-concept residual from cd-merge's report table."""
    values = []
    for line in log.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].startswith("<new"):
            values.append(float(parts[2]))
    return max(values)


def run_scenario(work: Path, scenario: str, caption_counts: list[int], size: str = "full") -> list[dict]:
    subprocess.run([sys.executable, __file__, "--job", "build", str(work), scenario, size], check=True)
    base, files = paths(work, scenario, size)
    inputs = [str(f) for f in files]
    input_gib = sum(f.stat().st_size for f in files) / 2**30
    rows = []
    for captions in caption_counts:
        cache = work / f"gram-cache-{scenario}-{captions}"
        shutil.rmtree(cache, ignore_errors=True)
        output = str(work / f"out-{scenario}.safetensors")
        print(f"{scenario}, {captions} captions: ours cold ...", flush=True)
        cold = measure("ours", str(base), output, str(cache), str(captions), *inputs)
        print(f"{scenario}, {captions} captions: ours cached ...", flush=True)
        cached = measure("ours", str(base), output, str(cache), str(captions), *inputs)
        print(f"{scenario}, {captions} captions: floor, cold and cached ...", flush=True)
        floor_output = str(work / f"out-{scenario}-floor.safetensors")
        floor = {kind: measure("floor", str(base), floor_output, str(captions), flag, *inputs)
                 for kind, flag in (("cold", "1"), ("cached", "0"))}
        row = {"scenario": scenario, "concepts": len(files), "captions": captions, "input_gib": input_gib,
               "cold": cold, "cached": cached, "floor": floor, "ours_residual": ours_residual(cached["log"])}
        if scenario != "sdxl":
            print(f"{scenario}, {captions} captions: baseline ...", flush=True)
            theirs = str(work / f"out-{scenario}-baseline.bin")
            row["baseline"] = measure("baseline", str(base), theirs, str(captions), *inputs)
            row["difference"] = in_child_difference(base, output, theirs)
        rows.append(row)
        print(describe(row), flush=True)
    return rows


def in_child_difference(base: Path, ours: str, theirs: str) -> float:
    """:func:`difference` in a fresh interpreter (:func:`job_difference`): loading two merged results
    here would grow this process, and a child's peak RSS as the OS reports it counts its parent's
    memory at the fork (in one full run the SDXL merge's peak read 3.33 GiB after the SD1.5
    differences, against 2.44 GB measured alone)."""
    command = [sys.executable, __file__, "--job", "difference", str(base), ours, theirs]
    printed = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(printed.splitlines()[-1])["difference"]


def difference(base: Path, ours: str, theirs: str) -> float:
    """Relative difference of the two merged results' K/V weights over all layers: both solve the
    same problem, so it should be at the baseline's float32 rounding, amplified by cond(G)."""
    from mergekit_cd.base import open_base
    from mergekit_cd.delta import dense
    from mergekit_cd.loading import load

    model = open_base(base)
    first, second = load(ours, base=model), load(theirs, base=model, check_base=False)
    squared_difference = squared_norm = 0.0
    for name in first.layers:
        key, value = model.kv(name)
        mine, theirs = first.layers[name], second.layers[name]
        for weight, a, b in ((key, mine.key, theirs.key), (value, mine.value, theirs.value)):
            a, b = weight.double() + dense(a).double(), weight.double() + dense(b).double()
            squared_difference += float((a - b).square().sum())
            squared_norm += float(a.square().sum())
    return (squared_difference / squared_norm) ** 0.5


def describe(row: dict) -> str:
    """One scenario's table row: every ratio by wall time and by CPU time, from this run."""
    cold, cached, baseline, floor = row["cold"], row["cached"], row.get("baseline"), row["floor"]

    def pair(first: dict, second: dict, key: str = "seconds") -> str:
        return f"{first[key]:.0f} / {second[key]:.0f}"

    def ratios(over: tuple[dict, dict], under: tuple[dict, dict], key: str) -> str:
        return " / ".join(f"{a[key] / b[key]:.1f}x" for a, b in zip(over, under))

    ours, floors = (cold, cached), (floor["cold"], floor["cached"])
    text = (f"| {row['scenario']} | {row['concepts']} | {row['captions']} | {row['input_gib']:.2f} "
            f"| {pair(cold, cached)} | {pair(*floors)} | {ratios(ours, floors, 'seconds')} "
            f"| {ratios(ours, floors, 'cpu')} | {cold['peak_gib']:.2f} ")
    if baseline is None:
        return text + (f"| n/a | n/a | n/a | {cold['peak_gib'] / row['input_gib']:.2f}x inputs "
                       f"| {row['ours_residual']:.1e} | n/a | n/a |")
    theirs = (baseline, baseline)
    return text + (f"| {baseline['seconds']:.0f} | {ratios(theirs, ours, 'seconds')} | {ratios(theirs, ours, 'cpu')} "
                   f"| {baseline['peak_gib'] / cold['peak_gib']:.1f}x less "
                   f"| {row['ours_residual']:.1e} | {baseline['residual']:.1e} | {row['difference']:.1e} |")


HEADER = ("| scenario | concepts | captions | inputs GiB | ours s (cold / cached) | floor s (cold / cached) "
          "| ours / floor (cold / cached) | ours / floor, CPU time | ours peak GiB | baseline s "
          "| speed-up (cold / cached) | speed-up, CPU time | memory | ours residual | baseline residual "
          "| ours vs baseline |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "work",
                        help="where models, concepts and outputs are kept (default benchmarks/work)")
    parser.add_argument("--only", nargs="+", choices=("sd15", "sdxl", "many"),
                        help="these scenarios (default: all three)")
    parser.add_argument("--captions", type=int, nargs="+", default=DEFAULT_CAPTIONS,
                        help="caption counts for the sd15 scenario (default 200 1000)")
    parser.add_argument("--quick", action="store_true",
                        help="the sd15 scenario alone with 50 captions (about 3 minutes once its base is built)")
    parser.add_argument("--tiny", action="store_true",
                        help="the scenarios on the test suite's tiny models: the script end to end, "
                             "figures meaningless (kept apart from the full-size ones under --work)")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.job:
        JOBS[args.job](*rest)
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.quick and (args.only or args.captions != DEFAULT_CAPTIONS):
        parser.error("--quick runs the sd15 scenario alone with 50 captions; leave out --only and --captions")
    if args.quick:
        args.only, args.captions = ["sd15"], [50]
    scenarios = args.only or ["sd15", "sdxl", "many"]
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for scenario in scenarios:
        counts = args.captions if scenario == "sd15" else [200]
        rows += run_scenario(args.work, scenario, counts, "tiny" if args.tiny else "full")
    import torch

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {memory:.0f} GiB, "
          f"python {platform.python_version()}, torch {torch.__version__}, load average at the end "
          f"{os.getloadavg()[0]:.1f}")
    if "sdxl" in scenarios:
        print("sdxl: the base holds its text encoders, tokenizers and the UNet's K/V tensors only "
              "(all a merge reads); no baseline (the authors' scripts are SD1-only)")
    print(HEADER)
    for row in rows:
        print(describe(row))


if __name__ == "__main__":
    main()
