"""Load and reliability test for `tunelab serve`, all traffic on 127.0.0.1, bounded in count and time.

    python bench/serve_load.py                       # builds a world-shaped tiny model in a temp dir
    python bench/serve_load.py runs/my-run           # any run dir / HF folder

First the ceiling, in-process: one generate for 1 row vs 16 rows (what batching could gain at most).
Then, against the real CLI server started as a subprocess:
  1. throughput with 1 client vs 16 concurrent clients (each sends requests back to back), and the
     same two figures with batching off (--max-batch-size 1), so the gain can be credited to batching;
  2. 64 concurrent clients x 20 requests (completions and chat, a quarter of them streamed):
     errors (must be 0), p50/p99 latency, requests/s;
  3. clients that disconnect mid-stream: the server must keep serving, and must stop generating for
     them (a request sent right after does not wait behind their long answers).
Results go to bench/results/serve_load.md (with this command line).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"  # never anything else: this script only loads the local machine
QUESTIONS = [f"What is the capital of country number {i}?" for i in range(50)]


def build_tiny_model(out: Path) -> Path:
    """The shipped world tokenizer and the world base's shape (llama, 256 hidden, 4 layers), random
    weights, saved with the qa template so the server renders prompts as for a qa run. Random weights
    rarely emit EOS, so every request generates exactly max_tokens: a steady workload."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tunelab.data.templates import resolve
    from tunelab.models import TEMPLATE_FILE
    from tunelab.world.build import assets_dir

    tok = AutoTokenizer.from_pretrained(assets_dir() / "data" / "tokenizer")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=640,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    (out / TEMPLATE_FILE).write_text(json.dumps(dataclasses.asdict(resolve("qa", "qa"))))
    return out


def step_cost(model: str, threads: int, tokens: int) -> dict:
    """The ceiling for batching: one batched generate of 1 row vs 16 rows, in this process, no HTTP."""
    import torch

    from tunelab.generate import Generator
    from tunelab.serve.engine import Row, generate_rows
    from tunelab.serve.models import Served, completion_ids

    if threads:
        torch.set_num_threads(threads)
    gen = Generator.load(model)
    served, ids = Served("m", gen), completion_ids(gen, QUESTIONS[0])
    best = {}
    for rows in (1, 16, 1, 16):  # the second round counts (warm)
        start = time.perf_counter()
        generate_rows(served, [Row(ids, tokens) for _ in range(rows)])
        best[rows] = time.perf_counter() - start
    return {"1": best[1], "16": best[16], "ideal_ratio": 16 * best[1] / best[16]}


class Server:
    """`tunelab serve MODEL` in a subprocess on a free loopback port; SIGINT stops it gracefully."""

    def __init__(self, model: str, log: Path, max_batch_size: int, threads: int, max_wait_ms: float) -> None:
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "tunelab", "serve", model, "--host", HOST, "--port", str(self.port)]
        cmd += [
            "--log-level",
            "warning",
            "--max-batch-size",
            str(max_batch_size),
            "--max-wait-ms",
            str(max_wait_ms),
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNELAB_API_KEY": ""}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)

    async def wait_ready(self, timeout: float = 180) -> str:
        import httpx

        deadline = time.time() + timeout
        async with httpx.AsyncClient() as c:
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
                try:
                    if (await c.get(self.url + "/health")).status_code == 200:
                        return (await c.get(self.url + "/v1/models")).json()["data"][0]["id"]
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError("server did not start in time")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


async def one_request(client, url: str, model: str, k: int, max_tokens: int, stream: bool) -> float:
    """Send request number k (completion or chat by parity); returns latency; raises on any error."""
    chat = k % 2 == 1
    q = QUESTIONS[k % len(QUESTIONS)]
    body: dict = {"model": model, "max_tokens": max_tokens, "stream": stream}
    body.update({"messages": [{"role": "user", "content": q}]} if chat else {"prompt": q})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    start = time.perf_counter()
    if stream:
        async with client.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            lines = [line async for line in r.aiter_lines() if line]
        if lines[-1] != "data: [DONE]":
            raise RuntimeError(f"stream did not end with [DONE]: {lines[-1][:200]}")
        last = json.loads(lines[-2].removeprefix("data: "))
        if last["choices"][0]["finish_reason"] not in ("stop", "length"):
            raise RuntimeError(f"stream ended without a finish_reason: {last}")
    else:
        r = await client.post(url + path, json=body)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        usage = r.json()["usage"]
        if not 0 < usage["completion_tokens"] <= max_tokens:
            raise RuntimeError(f"bad usage {usage}")
    return time.perf_counter() - start


async def run_clients(
    url: str, model: str, clients: int, per_client: int, max_tokens: int, stream_every: int, deadline: float
) -> dict:
    """`clients` concurrent clients, each sending `per_client` requests back to back."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []

    async def worker(c: int) -> None:
        # One connection per client, as separate programs would have (one shared 64-connection httpx
        # pool measured several seconds of p99 inside the client itself).
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=1)) as client:
            for i in range(per_client):
                if time.time() > deadline:
                    errors.append("time budget exhausted before the request was sent")
                    return
                k = c * per_client + i
                stream = bool(stream_every) and k % stream_every == 0
                try:
                    latencies.append(await one_request(client, url, model, k, max_tokens, stream))
                except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                    errors.append(f"{type(e).__name__}: {e}")

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in range(clients)))
    wall = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")

    return {
        "clients": clients,
        "requests": len(latencies) + len(errors),
        "errors": len(errors),
        "first_errors": errors[:3],
        "wall_s": wall,
        "req_per_s": len(latencies) / wall,
        "tokens_per_s": len(latencies) * max_tokens / wall,
        "p50_ms": pct(0.50) * 1000,
        "p99_ms": pct(0.99) * 1000,
    }


async def disconnects(url: str, model: str, n: int, max_tokens: int) -> dict:
    """n clients start long streams and hang up after the first event; then one short request."""
    import httpx

    async with httpx.AsyncClient(timeout=60) as client:
        start = time.perf_counter()
        await one_request(client, url, model, 0, max_tokens, stream=False)  # how long one full answer takes
        full_answer_s = time.perf_counter() - start

        async def hang_up(k: int) -> None:
            body = {"model": model, "prompt": QUESTIONS[k], "max_tokens": max_tokens, "stream": True}
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break  # leave mid-stream

        await asyncio.gather(*(hang_up(k) for k in range(n)))
        start = time.perf_counter()
        await one_request(client, url, model, 2, 8, stream=False)
        after_s = time.perf_counter() - start
        healthy = (await client.get(url + "/health")).status_code == 200
    return {
        "streams": n,
        "max_tokens": max_tokens,
        "full_answer_s": full_answer_s,
        "next_request_s": after_s,
        "healthy": healthy,
    }


async def measure(args: argparse.Namespace, model: str, logs: Path) -> dict:
    deadline = time.time() + args.time_limit
    out: dict = {}
    for label, batch in (("batched", args.max_batch_size), ("unbatched", 1)):
        if label == "unbatched" and args.no_baseline:
            continue
        server = Server(model, logs / f"server-{label}.log", batch, args.threads, args.max_wait_ms)
        try:
            name = await server.wait_ready()
            await run_clients(server.url, name, 4, 2, args.max_tokens, 0, deadline)  # warm up
            single = await run_clients(
                server.url, name, 1, args.scaling_requests, args.max_tokens, 0, deadline
            )
            sixteen = await run_clients(
                server.url, name, 16, args.scaling_requests, args.max_tokens, 0, deadline
            )
            out[label] = {"1": single, "16": sixteen}
            if label == "batched":
                out["load"] = await run_clients(
                    server.url,
                    name,
                    args.clients,
                    args.requests,
                    args.max_tokens,
                    args.stream_every,
                    deadline,
                )
                out["disconnect"] = await disconnects(server.url, name, 8, args.long_tokens)
        finally:
            out.setdefault("exit_codes", {})[label] = server.stop()
            stats = [
                line for line in server.log.read_text().splitlines() if line.startswith("server stopped")
            ]
            out.setdefault("batches", {})[label] = (
                stats[-1].removeprefix("server stopped: ") if stats else "?"
            )

    return out


def report(args: argparse.Namespace, results: dict, model_desc: str, command: str) -> str:
    b1, b16 = results["batched"]["1"], results["batched"]["16"]
    load, dc = results["load"], results["disconnect"]
    lines = [
        "# tunelab serve: load and reliability",
        "",
        f"Command: `{command}`",
        "",
        f"- when: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, load average at start {args.load_at_start}; Python {platform.python_version()}",
        f"- model: {model_desc}; server: `tunelab serve` subprocess on {HOST}, "
        f"--max-batch-size {args.max_batch_size}, default --max-wait-ms, OMP_NUM_THREADS={args.threads or 'default'}; "
        "the load-generating client shares the machine with the server",
        f"- every request: max_tokens {args.max_tokens}, greedy; the random-weight model never stops early, "
        "so each request costs exactly max_tokens decode steps",
        "- clients: asyncio + httpx in one process, one connection per client, each sending its next "
        "request as soon as the last one is answered; latency is measured in the client",
        "- the 2 cores are shared with other work (a pretraining job, other benchmarks): absolute figures "
        "move by tens of percent between runs; the ratios are the stable part",
        "",
        "## Throughput: 1 client vs 16 concurrent clients",
        "",
        "| server | clients | requests | req/s | tokens/s | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in ("batched", "unbatched"):
        for c in ("1", "16"):
            if label in results:
                r = results[label][c]
                lines.append(
                    f"| {label} | {c} | {r['requests']} | {r['req_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
                    f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} |"
                )
    lines += [
        "",
        f"**16 clients vs 1 with batching: {b16['req_per_s'] / max(b1['req_per_s'], 1e-9):.1f}x** (target >= 4x).",
        f"Ceiling without HTTP: one generate of {args.max_tokens} tokens takes "
        f"{results['ceiling']['1'] * 1000:.0f} ms for 1 row and {results['ceiling']['16'] * 1000:.0f} ms "
        f"for 16 rows in-process, so 16 clients can get at most {results['ceiling']['ideal_ratio']:.1f}x.",
    ]
    if "unbatched" in results:
        u1, u16 = results["unbatched"]["1"], results["unbatched"]["16"]
        lines.append(
            f"With batching off (--max-batch-size 1) the same ratio is {u16['req_per_s'] / max(u1['req_per_s'], 1e-9):.1f}x."
        )
    lines += [
        "",
        f"## {args.clients} concurrent clients x {args.requests} requests",
        "",
        f"Half completions, half chat; every {args.stream_every}th request streamed (server-sent events, checked to end with "
        "`data: [DONE]` and a finish_reason).",
        "",
        "| requests | errors | req/s | p50 ms | p99 ms | wall s |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {load['requests']} | {load['errors']} | {load['req_per_s']:.1f} | {load['p50_ms']:.0f} | "
        f"{load['p99_ms']:.0f} | {load['wall_s']:.1f} |",
        "",
    ]
    if load["errors"]:
        lines += ["First errors:", "", *[f"- `{e}`" for e in load["first_errors"]], ""]
    lines += [
        "## Clients that disconnect mid-stream",
        "",
        f"{dc['streams']} clients each started a {dc['max_tokens']}-token stream and hung up after the first "
        f"event. One full {dc['max_tokens']}-token answer takes {dc['full_answer_s']:.2f} s; the request sent right "
        f"after the hang-ups took {dc['next_request_s']:.2f} s (had the abandoned rows kept generating it would "
        f"wait behind them); /health afterwards: {'200' if dc['healthy'] else 'FAILED'}.",
        "",
        f"Graceful shutdown (SIGINT) exit codes: {results['exit_codes']}. Batches over the whole run, as the "
        f"server logged them at shutdown: {results['batches']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="run dir or HF folder (default: a tiny world-shaped model)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=20, help="per client in the load phase")
    p.add_argument("--scaling-requests", type=int, default=10, help="per client in the 1-vs-16 phase")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--stream-every", type=int, default=4, help="stream every k-th request of the load phase")
    p.add_argument("--long-tokens", type=int, default=512, help="length of the streams clients abandon")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--time-limit", type=float, default=600, help="seconds; no request is sent after this")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS for the server (0 = torch's default); on a busy machine 1 avoids spin-waiting",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the --max-batch-size 1 server")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.md"))
    args = p.parse_args()
    args.load_at_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    command = " ".join(["python bench/serve_load.py", *sys.argv[1:]])
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if args.model:
            model, desc = args.model, args.model
        else:
            model = str(build_tiny_model(tmp_path / "tiny"))
            desc = "random-weight llama in the world base's shape (256 hidden, 4 layers, 4096 vocab), qa template"
        ceiling = step_cost(model, args.threads, args.max_tokens)
        results = asyncio.run(measure(args, model, tmp_path))
        results["ceiling"] = ceiling
        print(json.dumps(results, indent=1, default=str))
        for log in sorted(tmp_path.glob("server-*.log")):
            print(f"--- {log.name} (tail)\n{log.read_text()[-1500:]}")
    text = report(args, results, desc, command)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    ok = results["load"]["errors"] == 0 and results["disconnect"]["healthy"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
