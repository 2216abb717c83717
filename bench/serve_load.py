"""`kmel serve` under load: N concurrent clients over loopback for a bounded time, on real images.

usage: python bench/serve_load.py --models DIR [--clients 1,4,16] [--duration 20] [--runtimes tf,tflite]
                                  [--files-per-request 1] [--images 64] [--out bench/out/serve-load]

- The server is the real command, ``python -m kmel serve --models DIR --port P --runtime R``, in a fresh process
  on a free 127.0.0.1 port; ``tflite`` is run only where ``DIR/tflite`` exists (``kmel export --format tflite``).
- The images are the first ``--images`` of the fixed test split of the 2,594 real ISIC 2018 images
  (``../shared/data/isic2018-task1-256``, 256 px JPEGs), sent as they are, ``--files-per-request`` per request.
- Each setting: a short warm-up (first calls trace the graphs), then ``N`` client threads, each with its own
  keep-alive connection, post one request after another until ``--duration`` seconds have passed (a request
  started before then is waited for). Throughput counts the images of answered requests over the wall time;
  latency is per request (p50 / p95 / p99); errors are non-200 answers (429 counted apart) and entries with
  status=error. A sampler reads the server's resident memory (VmRSS of it and its children, from /proc) every
  0.1 s: its peak, and at the start and end of each setting (flat memory: the end is not above the start).
- Prints one line per setting and writes ``OUT/result.json``.

Aim (DESIGN.md): 16 concurrent clients, 0 errors, flat memory.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from _common import OUT, REPO, require_shared
from predict import GIB, tree_rss

BOUNDARY = "kmel-serve-load"


def test_images(n: int) -> list[Path]:
    """The first ``n`` images of the ISIC 2018 set's fixed test split (real 256 px dermoscopy JPEGs)."""
    import pandas as pd

    root = require_shared() / "isic2018-task1-256"
    labels = pd.read_csv(root / "labels.csv")
    ids = labels.loc[labels["split"] == "test", "image_id"].head(n)
    return [root / "images" / f"{i}.jpg" for i in ids]


def multipart(paths: list[Path]) -> bytes:
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{p.name}"\r\n'
             "Content-Type: image/jpeg\r\n\r\n".encode() + p.read_bytes() + b"\r\n" for p in paths]
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(models: Path, runtime: str, port: int, log: Path) -> subprocess.Popen:
    """``kmel serve`` in a fresh process (its output in ``log``), once it answers /api/health."""
    cmd = [sys.executable, "-m", "kmel", "serve", "--models", str(models), "--port", str(port), "--runtime", runtime,
           "--log-level", "warning", "--max-concurrent", "64"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"kmel serve exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/api/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("kmel serve did not answer /api/health within 300 s")


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, dict]:
    conn.request("POST", "/api/predict", body=body,
                 headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    response = conn.getresponse()
    data = response.read()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, {}


class Sampler:
    """Resident memory of the server's process tree every 0.1 s."""

    def __init__(self, pid: int):
        self.pid, self.samples, self.done = pid, [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.perf_counter(), tree_rss(self.pid)))
            time.sleep(0.1)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def load(port: int, bodies: list[tuple[bytes, int]], clients: int, duration: float, sampler: Sampler) -> dict:
    """``clients`` threads posting ``bodies`` round robin until ``duration`` seconds have passed."""
    latencies: list[float] = []
    counts = {"requests": 0, "images": 0, "http_errors": 0, "busy_429": 0, "entry_errors": 0}
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + duration
    first_sample = len(sampler.samples)

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        i = k
        while time.perf_counter() < deadline:
            body, n = bodies[i % len(bodies)]
            i += clients
            t0 = time.perf_counter()
            try:
                status, answer = post(conn, body)
            except (OSError, http.client.HTTPException):
                status, answer = -1, {}
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            seconds = time.perf_counter() - t0
            with lock:
                counts["requests"] += 1
                if status == 200:
                    latencies.append(seconds)
                    counts["images"] += n
                    counts["entry_errors"] += int(answer.get("n_error", 0))
                elif status == 429:
                    counts["busy_429"] += 1
                else:
                    counts["http_errors"] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    rss = [r for _, r in sampler.samples[first_sample:]] or [tree_rss(sampler.pid)]
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"clients": clients, "seconds": round(wall, 2), **counts,
            "errors": counts["http_errors"] + counts["busy_429"] + counts["entry_errors"],
            "images_per_s": round(counts["images"] / wall, 3),
            "latency_s": {f"p{p}": round(float(np.percentile(lat, p)), 3) for p in (50, 95, 99)},
            "rss_gib": {"start": round(rss[0] / GIB, 3), "end": round(rss[-1] / GIB, 3),
                        "peak": round(max(rss) / GIB, 3)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True, help="Exported models (segmenter/, classifier/, pipeline.json).")
    parser.add_argument("--clients", default="1,4,16", help="Comma list of concurrent clients [1,4,16].")
    parser.add_argument("--duration", type=float, default=20.0, help="Seconds of load per setting [20].")
    parser.add_argument("--runtimes", default="tf,tflite",
                        help="tf and/or tflite (tflite only where MODELS/tflite exists) [tf,tflite].")
    parser.add_argument("--files-per-request", type=int, default=1, help="Images per request [1].")
    parser.add_argument("--images", type=int, default=64, help="Distinct real images sent round robin [64].")
    parser.add_argument("--out", default=str(OUT / "serve-load"), help="Folder for result.json.")
    args = parser.parse_args()
    models = Path(args.models)
    images = test_images(args.images)
    k = args.files_per_request
    bodies = [(multipart(images[i : i + k]), len(images[i : i + k])) for i in range(0, len(images), k)]
    clients = [int(c) for c in args.clients.split(",")]
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if "tflite" in runtimes and not (models / "tflite").is_dir():
        print(f"no {models / 'tflite'}: tflite skipped (kmel export --format tflite --models {models})")
        runtimes.remove("tflite")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"models": str(models), "images": len(images), "files_per_request": k, "duration_s": args.duration,
                     "cpus": os.cpu_count(), "runtimes": {}}
    print(f"{'runtime':8s} {'clients':>7s} {'img/s':>7s} {'p50 s':>7s} {'p95 s':>7s} {'p99 s':>7s} {'errors':>6s} "
          f"{'429':>4s} {'RSS start/end/peak GiB':>24s}", flush=True)
    for runtime in runtimes:
        port = free_port()
        t0 = time.perf_counter()
        server = start_server(models, runtime, port, out / f"server-{runtime}.log")
        started = time.perf_counter() - t0
        try:
            sampler = Sampler(server.pid)
            warm = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            for body, _ in bodies[:4]:
                post(warm, body)
            warm.close()
            rows = []
            for n in clients:
                row = load(port, bodies, n, args.duration, sampler)
                rows.append(row)
                r = row["rss_gib"]
                print(f"{runtime:8s} {n:7d} {row['images_per_s']:7.2f} {row['latency_s']['p50']:7.3f} "
                      f"{row['latency_s']['p95']:7.3f} {row['latency_s']['p99']:7.3f} {row['errors']:6d} "
                      f"{row['busy_429']:4d} {r['start']:8.2f} / {r['end']:.2f} / {r['peak']:.2f}", flush=True)
            sampler.stop()
            peak = max(r for _, r in sampler.samples) if sampler.samples else 0
            results["runtimes"][runtime] = {"startup_s": round(started, 1), "peak_rss_gib": round(peak / GIB, 3),
                                            "settings": rows}
        finally:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    (out / "result.json").write_text(json.dumps(results, indent=2))
    print(f"-> {out / 'result.json'}")


if __name__ == "__main__":
    main()
