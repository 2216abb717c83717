"""build-records on an ISIC 2024-sized synthetic SLICE-3D folder: wall time, crops/s and memory.

usage: python bench/records_hdf5.py [--n 50000] [--workers 2] [--out bench/out/records-hdf5] [--generate-only]

1. OUT/data: ``train-image.hdf5`` + ``train-metadata.csv`` from
   :func:`kmel.data.synthetic_isic2024.make_isic2024_dataset` (seed 0, 128 px), timed; reused when OUT/data
   already holds a complete folder of the same ``--n`` (OUT/generated.json says so).
2. Unless ``--generate-only``: ``kmel.data.records.build_records(OUT/data, OUT/records, config)`` with
   ``config = load_config("cpu-small", {"records.workers": W})``, OUT/records removed first (no cache), in a
   fresh child process so that the memory figures are the build's alone, not the generator's: wall seconds,
   crops/s, the peak RSS of the process that calls build_records (ru_maxrss), of its largest worker
   (RUSAGE_CHILDREN), and the peak of the sum of both sampled every 0.5 s (VmRSS of the process and all its
   descendants, from /proc).
Prints the figures and writes OUT/result.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from _common import OUT, Timer

MIB = 1024 * 1024
SAMPLE_SECONDS = 0.5


def generate(out: Path, n: int) -> dict:
    """OUT/data with ``n`` crops (reused when already there), and how long it took to write."""
    from kmel.data.synthetic_isic2024 import (
        IMAGES_HDF5,
        METADATA_CSV,
        make_isic2024_dataset,
    )

    data, stamp = out / "data", out / "generated.json"
    done = json.loads(stamp.read_text()) if stamp.exists() else {}
    if done.get("n") == n and (data / METADATA_CSV).exists() and (data / IMAGES_HDF5).exists():
        return {**done, "reused": True}
    shutil.rmtree(data, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    with Timer() as t:
        make_isic2024_dataset(data, n_images=n, seed=0, progress=True)
    done = {"n": n, "seconds": round(t.seconds, 1), "crops_per_s": round(n / t.seconds, 1),
            "hdf5_mib": round((data / IMAGES_HDF5).stat().st_size / MIB, 1)}
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(done, indent=2))
    return {**done, "reused": False}


# ---------------------------------------------------------------------------------------------
# Memory of a process tree
# ---------------------------------------------------------------------------------------------
def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (parent ids read from /proc/<pid>/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # the process ended meanwhile
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # the name in (...) may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0  # ended, or a zombie (no VmRSS line)


class TreeSampler(threading.Thread):
    """Sums VmRSS over this process and its descendants every ``SAMPLE_SECONDS``; keeps the peak."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kib, self.samples, self.peak_processes = 0, 0, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            tree = _descendants(os.getpid())
            total = sum(_rss_kib(pid) for pid in tree)
            if total > self.peak_kib:
                self.peak_kib, self.peak_processes = total, len(tree)
            self.samples += 1
            self._stop_event.wait(SAMPLE_SECONDS)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def measure_records(data: Path, records: Path, workers: int) -> dict:
    """Run build_records in this process (a fresh one: see the module docstring) and measure it."""
    import pandas as pd

    from kmel.config import load_config
    from kmel.data.records import build_records, format_counts
    from kmel.data.synthetic_isic2024 import METADATA_CSV

    shutil.rmtree(records, ignore_errors=True)
    n = len(pd.read_csv(data / METADATA_CSV, usecols=["isic_id"]))
    config = load_config("cpu-small", {"records.workers": workers})
    sampler = TreeSampler()
    sampler.start()
    with Timer() as t:
        manifest = build_records(data, records, config, progress=True)
    sampler.stop()
    return {
        "n": n, "workers": workers, "seconds": round(t.seconds, 1), "crops_per_s": round(n / t.seconds, 1),
        # ru_maxrss is in KiB on Linux; RUSAGE_CHILDREN is the largest finished child, not a sum.
        "parent_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "largest_child_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "sampled_total_peak_rss_mib": round(sampler.peak_kib / 1024, 1),
        "processes_at_sampled_peak": sampler.peak_processes, "rss_samples": sampler.samples,
        "counts": format_counts(manifest),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000, help="crops in the synthetic folder")
    parser.add_argument("--workers", type=int, default=2, help="records.workers (0: one per core)")
    parser.add_argument("--out", type=Path, default=OUT / "records-hdf5")
    parser.add_argument("--generate-only", action="store_true", help="make (or reuse) the folder, no build")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the child of step 2
    args = parser.parse_args()
    out = args.out.resolve()
    if args.measure:
        print(json.dumps(measure_records(out / "data", out / "records", args.workers)))
        return

    result: dict = {"n": args.n, "cpu_count": os.cpu_count()}
    result["generate"] = generate(out, args.n)
    g = result["generate"]
    print(f"synthetic ISIC 2024 folder, {args.n} crops: "
          + ("reused" if g["reused"] else f"written in {g['seconds']} s ({g['crops_per_s']} crops/s)")
          + f"; train-image.hdf5 {g['hdf5_mib']} MiB")
    if not args.generate_only:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", "--out", str(out),
               "--workers", str(args.workers)]
        child = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        r = result["records"] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"build-records, {r['workers']} workers: {r['seconds']} s ({r['crops_per_s']} crops/s); peak RSS: "
              f"parent {r['parent_peak_rss_mib']} MiB, largest worker {r['largest_child_peak_rss_mib']} MiB, "
              f"sampled total {r['sampled_total_peak_rss_mib']} MiB ({r['processes_at_sampled_peak']} processes, "
              f"{r['rss_samples']} samples)\n{r['counts']}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"-> {out / 'result.json'}")


if __name__ == "__main__":
    main()
