"""Train the variant families' models (families.py) and measure their accuracy.

    python -m cellserve.graph.zoo.train_variants                 # train every variant, then measure
    python -m cellserve.graph.zoo.train_variants --measure-only  # measure the checked-in weights
    python -m cellserve.graph.zoo.train_variants --only reverse-h16

Each variant is trained by the zoo's own script (train_seq2seq.main: the shared teacher-forced
loop) with the width, steps and seed its VariantSpec gives, on one thread (deterministic for a
given thread count), and written to its weights file. Then each is measured as families.py's
contract says (families.measure on ACCURACY_INPUTS inputs from ACCURACY_SEED's stream); the
figures printed are what VariantSpec.accuracy records (copied there by hand: the source is
not rewritten by a script).
"""

from __future__ import annotations

import argparse
import time

from cellserve.graph.zoo import families, train_seq2seq


def train(spec: families.VariantSpec) -> None:
    train_seq2seq.main(["--out", str(spec.path), "--embed", str(spec.embed), "--hidden", str(spec.hidden),
                        "--steps", str(spec.steps), "--seed", str(spec.seed), "--threads", "1"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=[], help="a variant name (repeatable); default all")
    p.add_argument("--measure-only", action="store_true", help="measure the weights already there")
    args = p.parse_args(argv)
    try:
        specs = [families.variant(n) for n in args.only] or list(families.VARIANTS.values())
    except KeyError as exc:
        p.error(str(exc.args[0]))
    if not args.measure_only:
        for spec in specs:
            train(spec)
    import torch

    torch.set_num_threads(1)
    for spec in specs:
        start = time.perf_counter()
        acc = families.measure(spec.name, families.ACCURACY_INPUTS, families.ACCURACY_SEED)
        print(f"{spec.name}: exact match {acc:.4f} on {families.ACCURACY_INPUTS} fresh inputs "
              f"(seed {families.ACCURACY_SEED}, {time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
