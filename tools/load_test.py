"""Load test for `dgrun serve`: N concurrent clients on loopback for T seconds, at several N.

    python tools/load_test.py                          # starts `dgrun serve` on the demo model, 1/4/16 clients
    python tools/load_test.py --clients 1,4 --seconds 10 -m model.dgf --backend cpu
    python tools/load_test.py --url http://127.0.0.1:8080 --pid 1234    # a server that is already running

Each client sends /v1/completions requests back to back (a short code prompt from a fixed list, its own seed per
request, `max_tokens` new tokens) until the time is up; a request still running then is waited for and counted.
Per level it prints requests/s, completion tokens/s, latency p50/p95/p99, errors (any non-200 answer or
exception) and the server's resident memory before and after the level (VmRSS, Linux; needs the server's pid).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef main():", "class Point:\n    def __init__(self, x, y):",
           "for i in range(10):", "with open(path) as f:", "def parse(text):\n    \"\"\"Parse", "x = [1, 2, 3]\n"]


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "dgrun", "serve", "--port", "0", "--max-batch", str(args.max_batch),
               "--max-queue", str(args.max_queue), "--backend", args.backend]
    if args.model:
        command += ["-m", args.model]
    if args.threads:
        command += ["-t", str(args.threads)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert server.stderr is not None
    for _ in range(20):
        line = server.stderr.readline()
        found = re.search(r"dgrun: listening on (http://\S+)", line)
        if found:
            url = found.group(1)
            break
        if not line:
            sys.exit(f"load_test: the server did not start (exit status {server.wait()})")
    else:
        sys.exit("load_test: the server did not say where it listens")
    threading.Thread(target=server.stderr.read, daemon=True).start()  # keep draining its log
    deadline = time.monotonic() + 300
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            # trust_env=False: a proxy named in the environment must not stand between us and loopback.
            answer = httpx.get(url + "/health", timeout=5, trust_env=False)
            if answer.status_code == 200:
                return server, url
            last = f"{answer.status_code} {answer.text[:200]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        if server.poll() is not None:
            sys.exit(f"load_test: the server exited with status {server.returncode} before the model loaded")
        time.sleep(0.2)
    server.kill()
    sys.exit(f"load_test: the model did not load within 300 s (last /health: {last})")


def run_level(url: str, clients: int, seconds: float, max_tokens: int, seed_base: int) -> dict[str, Any]:
    latencies: list[float] = []
    tokens, errors = [0], [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(k: int) -> None:
        with httpx.Client(timeout=600, trust_env=False) as http:
            n = 0
            while time.monotonic() < stop_at:
                body = {"prompt": PROMPTS[(k + n) % len(PROMPTS)], "max_tokens": max_tokens,
                        "seed": seed_base + k * 100_000 + n}
                started = time.monotonic()
                try:
                    response = http.post(url + "/v1/completions", json=body)
                    ok = response.status_code == 200
                    used = response.json()["usage"]["completion_tokens"] if ok else 0
                except (httpx.HTTPError, ValueError, KeyError):
                    ok, used = False, 0
                with lock:
                    latencies.append(time.monotonic() - started)
                    tokens[0] += used
                    errors[0] += not ok
                n += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, math.ceil(p / 100 * len(latencies)) - 1)] if latencies else 0.0

    return {"clients": clients, "seconds": wall, "requests": len(latencies), "requests_per_s": len(latencies) / wall,
            "tokens_per_s": tokens[0] / wall, "p50_s": pct(50), "p95_s": pct(95), "p99_s": pct(99),
            "errors": errors[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an already running server (default: start `dgrun serve`)")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, for its memory")
    parser.add_argument("-m", "--model", help="the .dgf to serve (default: the demo model)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("-t", "--threads", type=int, help="the server's CPU threads")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts (default: 1,4,16)")
    parser.add_argument("--seconds", type=float, default=30, help="per level (default: 30)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default: 64)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print the results as JSON lines")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    server, url, pid = None, args.url, args.pid
    if url is None:
        server, url = start_server(args)
        pid = server.pid
    try:
        info = httpx.get(url + "/props", timeout=30, trust_env=False).json()
        run_level(url, 1, 0, args.max_tokens, 0)  # one warm-up request
        rows = []
        for k, clients in enumerate(levels):
            before = rss_mib(pid)
            row = run_level(url, clients, args.seconds, args.max_tokens, seed_base=(k + 1) * 10_000_000)
            row.update(rss_before_mib=before, rss_after_mib=rss_mib(pid))
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
    if not args.json:
        backend = info.get("dgrun", {}).get("backend", "?")
        print(f"# {info['default_generation_settings']['model']} on {backend}, {os.cpu_count()} CPUs; "
              f"/v1/completions, {args.max_tokens} new tokens, {args.seconds:.0f} s per level, "
              f"max batch {args.max_batch}")
        print("| clients | requests | req/s | tokens/s | p50 s | p95 s | p99 s | errors | server RSS MiB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            rss = "n/a" if r["rss_before_mib"] is None else f"{r['rss_before_mib']:.0f} → {r['rss_after_mib']:.0f}"
            print(f"| {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                  f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['p99_s']:.2f} | {r['errors']} | {rss} |")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
