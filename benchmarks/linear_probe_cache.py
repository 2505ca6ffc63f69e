"""The linear probe per grid point: through the frozen backbone every epoch, or on cached features.

    python benchmarks/linear_probe_cache.py            # dtd10 of the offline suite, 20 epochs, default backbone
    python benchmarks/linear_probe_cache.py --quick

Three runs of the same grid point in one process, with an empty feature cache: uncached
(``cache: off``), the first cached run (computes the features once, then trains the head), and a
second cached run (another grid point of a study: the features are read back). Wall time of each
``train()`` call; the results must agree (tests/test_cache.py checks them to float tolerance).
Results: benchmarks/results/linear_probe_cache.json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from common import header, write_json

from ivpt.engine.config import load_config
from ivpt.engine.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    epochs = 2 if args.quick else 20
    report = {**header(libraries=()), "task": "dtd10", "epochs": epochs, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["IVPT_CACHE"] = str(Path(tmp) / "cache")
        for name, cache in (("uncached", "off"), ("cached, first", "auto"), ("cached, again", "auto")):
            fields = dict(method="linear", method_options={}, data={"kind": "suite", "task": "dtd10"}, epochs=epochs,
                          warmup_epochs=0, batch_size=32, optimizer="adamw", lr_scaling=False, lr=0.01,
                          precision="fp32", cache=cache, output=str(Path(tmp) / name.replace(", ", "-")))
            start = time.perf_counter()
            result = train(load_config(None, fields=fields), quiet=True)
            report["runs"][name] = {"seconds": time.perf_counter() - start, "val_top1": result["val"]["top1"]}
            print(name, json.dumps(report["runs"][name]), flush=True)
    runs = report["runs"]
    report["uncached_vs_cached_again"] = runs["uncached"]["seconds"] / runs["cached, again"]["seconds"]
    report["uncached_vs_cached_first"] = runs["uncached"]["seconds"] / runs["cached, first"]["seconds"]
    print(f"uncached / cached: {report['uncached_vs_cached_first']:.1f}x (first), "
          f"{report['uncached_vs_cached_again']:.1f}x (features reused)")
    write_json("linear_probe_cache_quick.json" if args.quick else "linear_probe_cache.json", report)


if __name__ == "__main__":
    main()
