"""The benchmark-validity figures of docs/BENCHMARKS.md: the standard preset on two worlds.

    python benchmarks/validity.py --out runs/validity [--preset standard] [--world-seeds 0,1] [--set KEY=VALUE ...]
    python benchmarks/validity.py --out runs/validity --world-seeds 0,1 --compose

Worlds can run in separate processes at once (``--world-seeds 0`` and ``--world-seeds 1`` with the same
``--out``); ``--compose`` then trains nothing and writes ``OUT/validity.md`` from the finished
``OUT/world*/`` runs, with the sign agreement between them.

For each world seed, one complete run of the preset (its own world, language world, teacher and
students; ``corpus.seed`` is the world seed, the training seeds are the preset's), each writing
``validity.md`` (ranking with CIs, steps and compute; every reading; the controls with effect, CI and
Holm p per seed; the minimum detectable effects). Then, for every pair of methods, whether the sign of
their difference agrees between the two worlds and whether it is significant in both. Everything is
written to ``OUT/validity.md``; wall times per world are printed (they depend on the machine's load).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    import yaml

    from kdbench.demo import preset_with, run_demo
    from kdbench.synthetic.assess import READINGS, sign_agreement_markdown, validity_markdown

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="standard")
    parser.add_argument("--world-seeds", default="0,1")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--compose", action="store_true",
                        help="train nothing: compose validity.md from the finished OUT/world*/ runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="preset override, KEY=VALUE")
    args = parser.parse_args()
    overrides: dict = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    worlds = [int(s) for s in args.world_seeds.split(",")]
    folders, seconds = [], []
    for world in worlds:
        if args.compose:
            folder = args.out / f"world{world}"
            if not (folder / "demo.json").is_file():
                raise SystemExit(f"{folder} holds no finished run: run this world first (without --compose).")
            folders.append(folder)
            seconds.append(json.loads((folder / "demo.json").read_text()).get("timings", {}).get("total_seconds", float("nan")))
            continue
        corpus = {**overrides.get("corpus", {}), "seed": world}
        preset = preset_with(args.preset, {**overrides, "corpus": corpus})
        started = time.time()
        result = run_demo(preset, out_dir=args.out / f"world{world}", cache_dir=args.cache_dir, log=print,
                          progress=False)
        seconds.append(time.time() - started)
        folders.append(result.out_dir)
        print(f"world {world}: {seconds[-1] / 60:.1f} min")
    parts = [f"# {args.preset} preset on worlds {', '.join(map(str, worlds))}", ""]
    for world, folder, wall in zip(worlds, folders, seconds):
        text = validity_markdown(folder).replace("# Benchmark validity", f"## World {world}", 1)
        parts += [text.replace("\n## ", "\n### "), f"Wall time: {wall / 60:.1f} min.", ""]
    if len(folders) == 2:
        for metric in READINGS:
            parts += [f"## Sign agreement between worlds {worlds[0]} and {worlds[1]}: {metric}", "",
                      sign_agreement_markdown(folders[0], folders[1], metric,
                                              labels=(f"world {worlds[0]}", f"world {worlds[1]}"))]
    (args.out / "validity.md").write_text("\n".join(parts))
    print(f"wrote {args.out / 'validity.md'}")


if __name__ == "__main__":
    main()
