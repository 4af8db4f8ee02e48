#!/usr/bin/env python3
"""Loopback load test of `fluxswap serve` (standard library only).

Starts the server on a free port (or uses --url), sends --requests generations from --clients threads, each
request naming one of the adapters in --adapters at random (seeded), and prints throughput, latency percentiles,
the status counts and what /metrics says about LoRA swaps and the adapter cache.

    python3 bench/load_test.py --binary build/fluxswap --model ../shared/fixtures/tiny/pipeline \
        --lora-dir ../shared/fixtures/tiny --device cpu --requests 200 --clients 4
"""
import argparse
import http.client
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import urllib.parse


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def metric(text, series):
    m = re.search(r"^" + re.escape(series) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def start_server(args):
    cmd = [args.binary, "serve", "--port", "0", "--model", args.model, "--device", args.device,
           "--queue-size", str(max(16, args.clients * 2)), "--lora-mode", args.lora_mode,
           "--max-bypass", str(args.max_bypass)]
    if args.lora_dir:
        cmd += ["--lora-dir", args.lora_dir]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    else:
        sys.exit("server exited before listening")
    # Keep draining its output so it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, url


def wait_ready(host, port, timeout_s=120):
    until = time.time() + timeout_s
    while time.time() < until:
        try:
            c = http.client.HTTPConnection(host, port, timeout=5)
            c.request("GET", "/ready")
            r = c.getresponse()
            r.read()
            if r.status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit("server not ready")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server; default: start --binary")
    ap.add_argument("--binary", default="build/fluxswap")
    ap.add_argument("--model", default="../shared/fixtures/tiny/pipeline")
    ap.add_argument("--lora-dir", default="../shared/fixtures/tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lora-mode", default="merged")
    ap.add_argument("--max-bypass", type=int, default=4, help="server flag (0: plain FIFO, no grouping)")
    ap.add_argument("--adapters", default="lora_a_peft,lora_b_peft,lora_c_kohya")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--size", default="32x32")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    proc = None
    url = args.url
    if not url:
        proc, url = start_server(args)
    u = urllib.parse.urlparse(url)
    wait_ready(u.hostname, u.port)

    adapters = [a for a in args.adapters.split(",") if a]
    rng = random.Random(args.seed)
    plan = [rng.choice(adapters) for _ in range(args.requests)]
    next_index = [0]
    lock = threading.Lock()
    latencies, statuses = [], {}

    def client():
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
        while True:
            with lock:
                i = next_index[0]
                if i >= len(plan):
                    return
                next_index[0] += 1
            body = json.dumps({"prompt": "a lighthouse at dusk", "size": args.size, "steps": args.steps, "seed": i,
                               "lora": [{"name": plan[i], "scale": 0.8}]})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                status = r.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
                status = "connection error"
            dt = time.perf_counter() - t0
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(dt)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    if proc:
        proc.terminate()
        proc.wait(timeout=30)

    lat = sorted(latencies)
    ok = statuses.get(200, 0)
    print(f"requests        {args.requests} over {args.clients} clients, {len(adapters)} adapters, "
          f"{args.size}, {args.steps} steps")
    print(f"statuses        {statuses}")
    print(f"wall            {wall:.2f} s")
    print(f"throughput      {ok / wall:.2f} requests/s")
    print(f"latency         p50 {percentile(lat, 50) * 1e3:.1f} ms, p90 {percentile(lat, 90) * 1e3:.1f} ms, "
          f"p99 {percentile(lat, 99) * 1e3:.1f} ms, max {lat[-1] * 1e3 if lat else float('nan'):.1f} ms")
    print(f"lora swaps      {metric(text, 'fluxswap_lora_swaps_total'):.0f} "
          f"({metric(text, 'fluxswap_lora_swap_seconds_total') * 1e3:.1f} ms in all); "
          f"without grouping about {args.requests * (1 - 1 / len(adapters)):.0f} expected")
    print(f"adapter cache   {metric(text, 'fluxswap_adapter_cache_hits_total'):.0f} hits, "
          f"{metric(text, 'fluxswap_adapter_cache_misses_total'):.0f} misses")
    return 0 if ok == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
