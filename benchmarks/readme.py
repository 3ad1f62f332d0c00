"""The measured tables of the project's markdown files, rendered from the
committed results files.

    python -m benchmarks.readme    # rewrites the generated blocks of every file in DOCS

Each block sits between `<!-- generated: NAME -->` and `<!-- end -->`, in
README.md (the headline), `benchmarks/RESULTS.md` (every other measured
table) or a page of `docs/`; `tests/harness/test_readme.py` checks that each file
holds what this renders, so no figure can drift from its results file.
Blocks write links from the repository root (`benchmarks/results/...`);
`render` makes them relative to the file that holds the block, and shows
the data paths of this machine's commands (`../shared/...`) as `PATH`.
"""

import glob
import json
import os
import re

import numpy as np

RESULTS = os.path.join(os.path.dirname(__file__), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
_BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- end -->)", re.S)


def _json(name):
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


def mlperf_flash():
    record = _json("mlperf_flash.json")
    rows = record["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))

    def row(model, variant):
        return next((r for r in rows if r["model"] == model and r["variant"] == variant), None)

    def ratio(r):
        return f"{r['bytes'] / r['mlperf_bytes']:.2f}x"

    lines = [f"`{record['command']}` ({record['seconds'] / 60:.0f} min, {record['date']}); "
             "bytes of each file, and over MLPerf's int8 file:", "",
             "| model | MLPerf int8 | converter int8 | slim int8 | LUT-Q 4-bit | 3-bit | 2-bit "
             "| 4-bit / 2-bit per channel | bit-exact |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for m in models:
        lut = [row(m, f"LUT-Q {b}-bit / tensor") for b in (4, 3, 2)]
        channel = [row(m, f"LUT-Q {b}-bit / channel") for b in (4, 2)]
        exact = all(r["bit_exact"] for r in rows if r["model"] == m)
        lines.append(
            f"| {m} | {lut[0]['mlperf_bytes']:,} | {ratio(row(m, 'int8 (converter)'))} "
            f"| {ratio(row(m, 'int8 slim'))} | "
            + " | ".join(f"{r['bytes']:,} ({ratio(r)})" for r in lut)
            + f" | {ratio(channel[0])} / {ratio(channel[1])} | {'all' if exact else 'NO'} |")
    if "arena_head" in rows[0]:
        lines += ["", "Arena growth of the 4-bit per-tensor files over slim int8, in TFLM's "
                  "two parts: the head (planned tensors) against the largest decoded "
                  "kernel, and the tail (persistent) per DECODE op:", "",
                  "| model | largest decoded kernel | head growth | tail growth (per op) |",
                  "| --- | ---: | ---: | ---: |"]
        for m in models:
            lut, slim = row(m, "LUT-Q 4-bit / tensor"), row(m, "int8 slim")
            tail = lut["arena_tail"] - slim["arena_tail"]
            lines.append(f"| {m} | {lut['decode_buffer']:,} "
                         f"| {lut['arena_head'] - slim['arena_head']:,} "
                         f"| {tail:,} ({tail / lut['compressed_tensors']:.0f}) |")
    return lines


def _mean_se(values):
    values = 100 * np.asarray(values)
    if len(values) < 2:  # no spread to show yet
        return f"{values.mean():.2f} %"
    se = values.std(ddof=1) / np.sqrt(len(values))
    return f"{values.mean():.2f} +- {se:.2f} %"


def dictionary_modes():
    record = _json("dictionary_modes.json")
    runs = record["runs"]

    def cell(prefix):
        values = [r["accuracy"] for r in runs if r["key"].startswith(prefix + "/seed")]
        return _mean_se(values) if values else ""

    seeds = len([r for r in runs if r["key"].startswith("test/float/seed")])
    lines = [f"`{record['command']}`; one epoch, Adam at {record['learning_rate']:g} "
             f"(chosen on the validation split), {seeds} seeds, mean +- SE:", "",
             "| bits | per tensor | scaled | per channel |", "| ---: | ---: | ---: | ---: |"]
    for bits in (4, 3, 2):
        lines.append(f"| {bits} | " + " | ".join(
            cell(f"test/lutq{bits}/{m}") for m in ("tensor", "scaled", "channel")) + " |")
    lines += ["", f"Float, same recipe: {cell('test/float')}."]
    return lines


def recipe():
    from benchmarks import recipe as recipe_lib

    if not os.path.exists(os.path.join(RESULTS, "recipe.json")):
        return ["(Not run yet: `python -m benchmarks.recipe --cifar10=... --resnet8_h5=...`.)"]
    record = _json("recipe.json")
    lines = [recipe_lib.command_line(record)]
    if "dictionary_rate" not in record:
        return lines + ["", "(The search is still running.)"]
    schedule = {"cosine": "cosine decay to 0 over all steps",
                "warmup": "cosine decay after a 10 % linear warm-up",
                "constant": "a constant rate"}[record["schedule"]]
    chosen = record.get("callbacks", {})
    callbacks = ""
    if chosen and not any(chosen.values()):
        callbacks = ("no `lutq_tf.callbacks` schedule and no batch-norm re-estimation before "
                     "training (none gained more than the noise on validation; most cost "
                     "accuracy), ")
    elif chosen:
        callbacks = ("the callbacks listed with a row (each gained more than the noise on "
                     "validation; the other rows none), ")
    lines += ["", f"Chosen on the validation split: Adam, batch 64, {schedule}, "
              f"`dictionary_rate={record['dictionary_rate']:g}`, {callbacks}and each variant's "
              f"peak rate below. Test accuracy after {record['epochs']} epochs on all training "
              "images, mean +- SE over seeds, against each variant's target gap to float "
              "(`benchmarks.recipe.TARGETS`):", ""]
    lines += _recipe_table(recipe_lib, record, "resnet8")
    lines += recipe_lib.tfmot_pairs(record)
    lines += recipe_lib.int4_pairs(record)
    if os.path.exists(os.path.join(RESULTS, "recipe_lenet.json")):
        lenet = _json("recipe_lenet.json")
        if "learning_rates" in lenet:
            lines += ["", "MNIST LeNet-5 ([`recipe_lenet.md`](benchmarks/results/"
                      "recipe_lenet.md); from a float LeNet-5 trained here), the same "
                      f"search: {recipe_lib.command_line(lenet)}", ""]
            lines += _recipe_table(recipe_lib, lenet, "lenet")
            lines += recipe_lib.tfmot_pairs(lenet)
            lines += recipe_lib.int4_pairs(lenet)
    return lines


def _recipe_table(recipe_lib, record, task):
    """The reported rows of a recipe record, with the task's targets."""
    runs = {r["key"]: r["accuracy"] for r in record["runs"]}
    epochs, rates = record["epochs"], record["learning_rates"]
    lines = ["| variant | `quantize_model` options | peak rate | accuracy | seeds "
             "| gap to float | target |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    base, done = None, 0
    for variant, options in recipe_lib.VARIANTS.items():
        name = recipe_lib.row(record, variant)
        values = [a for k, a in runs.items() if k.startswith(f"test/{name}/e{epochs}/seed")]
        if variant not in rates or (task != "resnet8" and not values):
            continue
        args = _quantize_options(options)
        callbacks = record.get("callbacks", {}).get(variant)
        if callbacks:
            args += "; callbacks: " + ", ".join(callbacks)
        if not values:
            lines.append(f"| {variant} | `{args}` | {rates[variant]:g} | (running) | 0 | | |")
            continue
        done += len(values)
        mean = 100 * np.mean(values)
        base = mean if variant == "float" else base
        gap = target = ""
        if base is not None and variant != "float":
            gap = f"{mean - base:+.2f} pp"
            margin = recipe_lib.TARGETS[task].get(variant)
            if margin is not None:
                target = f"<= {margin} pp: " + (
                    "met" if base - mean <= margin else f"missed by {base - mean - margin:.2f} pp")
        lines.append(f"| {variant} | `{args}` | {rates[variant]:g} | {_mean_se(values)} "
                     f"| {len(values)} | {gap} | {target} |")
    if not done:
        lines.append("| (the test rows are running) | | | | | | |")
    return lines


def _quantize_options(options):
    """A recipe row's options as `quantize_model` arguments."""
    if options is None:
        return "-"
    options = dict(options)
    args = []
    if options.pop("prune_allocation", "uniform") == "erk":
        args.append(f"overrides=erk_prune_overrides(model, {options.pop('prune_rate')})")
    return ", ".join([*(f"{k}={v!r}" for k, v in options.items()), *args])


def batchnorm():
    from benchmarks import batchnorm as batchnorm_lib

    return batchnorm_lib.markdown(_json("batchnorm.json")).rstrip("\n").splitlines()


def quickstart():
    with open(os.path.join(RESULTS, "quickstart.md")) as f:
        return f.read().rstrip("\n").splitlines()


def train_speed():
    """The header line and first table of `train_speed.md`."""
    with open(os.path.join(RESULTS, "train_speed.md")) as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("`"))
    table = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(table, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:start + 1] + [""] + lines[table:end]


def kmeans_profile():
    """The header line and table of `kmeans_profile.md`."""
    with open(os.path.join(RESULTS, "kmeans_profile.md")) as f:
        lines = f.read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("`"))
    table = next(i for i, line in enumerate(lines) if line.startswith("|"))
    return lines[start:start + 1] + [""] + lines[table:]


def budgets():
    record = _json("budgets.json")
    lines = ["; ".join(f"`{r['command']}`" for r in record["runs"]), "",
             "| model | budget | file | file / budget | estimate - file | bit-exact |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in record["mlperf"]:
        lines.append(f"| {r['model']} | {r['fraction']:g}x MLPerf = {r['budget_bytes']:,} "
                     f"| {r['file_bytes']:,} | {r['file_over_budget']:.3f} "
                     f"| {r['estimate_minus_file']:+d} | {'yes' if r['bit_exact'] else 'NO'} |")
    lines += ["", "Planned against uniform LUT-Q at the uniform model's file size (same "
              "fine-tuning: 1 epoch, Adam 1e-4 cosine, batch 64; Keras test accuracy, "
              "one row per seed):", "",
              "| suite | size of | seed | uniform | planned | planned - uniform |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    rows = {}
    for r in record["accuracy"]:
        rows.setdefault((r["suite"], r["bits"], r["seed"]), {})[r["variant"]] = r
    for (suite, bits, seed), v in rows.items():
        if "uniform" in v and "planned" in v:
            u, q = v["uniform"]["keras_accuracy"], v["planned"]["keras_accuracy"]
            lines.append(f"| {suite} | uniform {bits}-bit ({v['uniform']['file_bytes']:,} B) "
                         f"| {seed} | {100 * u:.2f} % | {100 * q:.2f} % "
                         f"| {100 * (q - u):+.2f} pp |")
    return lines


def ram_budget():
    record = _json("ram_budget.json")
    lines = [f"`{record['run']['command']}`", "",
             "| model | bits | limit | arena over int8 | flash vs unsplit | latency vs unsplit "
             "| split | targets |", "| --- | ---: | --- | ---: | ---: | ---: | --- | --- |"]
    for r in record["rows"]:
        latency = (f"{r['latency_us'] / r['unsplit_latency_us']:.2f}x"
                   if r.get("latency_us") and r.get("unsplit_latency_us") else "")
        lines.append(f"| {r['model']} | {r['bits']} | {r['variant']} {r['budget']} "
                     f"| {r['arena'] - r['int8_arena']:+,} "
                     f"| {r['bytes'] / r['unsplit_bytes']:.3f}x "
                     f"| {latency} | {r['splits']} | {r['targets']} |")
    return lines


def device():
    record = _json("device.json")
    rows = record["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    command = re.sub(r"--(models_dir|cifar10)=\S+", r"--\1=PATH", record["command"])

    def row(model, variant):
        return next((r for r in rows if r["model"] == model and r["variant"] == variant), None)

    def share(fraction):
        return f"+{100 * fraction:.1f} %"

    lines = [f"`{command}` ({record['seconds'] / 60:.0f} min, {record['date']}; "
             f"profile `{record['target']}`):", "",
             "| model | int8 file | int8 arena | LUT bits | LUT file | LUT firmware | LUT arena "
             "| LUT instr. | int4 file | int4 firmware | int4 arena | int4 instr. "
             "| planned firmware | planned instr. | default export writes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: | ---: | --- |"]
    for m in models:
        int8, lut, default = row(m, "int8"), row(m, "LUT (forced)"), row(m, "default")
        int4 = row(m, "int4")
        cells = ["-"] * 4 if int4 is None else [
            f"{int4['file_bytes']:,}", f"{int4['firmware_change']:+,}",
            f"{int4['arena_bytes']:,}", share(int4["int4_share"])]
        planned = row(m, "planned")
        cells += ["-"] * 2 if planned is None else [
            f"{planned['firmware_change']:+,}",
            share(planned["decode_share"] + planned["int4_share"])]
        lines.append(
            f"| {m} | {int8['file_bytes']:,} | {int8['arena_bytes']:,} | {lut['bits']} "
            f"| {lut['file_bytes']:,} | {lut['firmware_change']:+,} | {lut['arena_bytes']:,} "
            f"| {share(lut['decode_share'])} | " + " | ".join(cells)
            + f" | {'LUT' if default['decode_ops'] else 'int8'} |")
    return lines


BLOCKS = {"device": device, "mlperf_flash": mlperf_flash, "budgets": budgets,
          "ram_budget": ram_budget, "dictionary_modes": dictionary_modes, "recipe": recipe,
          "batchnorm": batchnorm,
          "quickstart": quickstart, "train_speed": train_speed,
          "kmeans_profile": kmeans_profile}


def docs():
    """The markdown files that may hold generated blocks: README.md,
    `benchmarks/RESULTS.md` and `docs/*.md`."""
    pages = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return [README, os.path.join(ROOT, "benchmarks", "RESULTS.md"), *pages]


_SHARED = re.compile(r"(?:\.\./|/work/)shared/[^\s`,;)]+")


def render(text, path=README):
    """`text` (the file at `path`) with every generated block re-rendered."""
    results = os.path.relpath(RESULTS, os.path.dirname(os.path.abspath(path)))
    results = results.replace(os.sep, "/")

    def block(match):
        name = match.group(2)
        if name not in BLOCKS:
            raise ValueError(f"{os.path.relpath(path, ROOT)}: unknown generated block "
                             f"{name!r}; known {list(BLOCKS)}")
        body = "\n".join(BLOCKS[name]())
        body = body.replace("](benchmarks/results/", f"]({results}/")
        body = _SHARED.sub("PATH", body)
        return match.group(1) + body + "\n" + match.group(4)

    return _BLOCK.sub(block, text)


def blocks(text):
    """The names of the generated blocks in `text`, in order."""
    return [m.group(2) for m in _BLOCK.finditer(text)]


def main():
    for path in docs():
        if not os.path.exists(path):
            continue
        with open(path) as f:
            text = f.read()
        new = render(text, path)
        if new != text:
            with open(path + ".tmp", "w") as f:
                f.write(new)
            os.replace(path + ".tmp", path)
        names = blocks(new)
        if names:
            print(f"{os.path.relpath(path, ROOT)}:", ", ".join(names))


if __name__ == "__main__":
    main()
