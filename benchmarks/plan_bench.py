"""Planning benchmark: token counting throughput, packing + balancing cost, balance quality.

Generates N rows of deterministic synthetic text (slices of the Python stdlib's docstrings with
lognormal lengths, plus a share of exact duplicates), then prints:

- MB/s of raw ``tiktoken.encode_ordinary_batch`` (all threads) vs
  ``dfbatch.plan._tokens.count_tokens``
  (default backend, and tiktoken-only), with the ratio and the distinct fraction;
- packing + balancing time as a fraction of tiktoken's counting time (goal <= 5%);
- the balance ratio, heaviest agent / lower bound (goal <= 1.01).

Run: ``python benchmarks/plan_bench.py --rows 1000000``. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import importlib
import time
import warnings

import numpy as np
import polars as pl

import dfbatch
from dfbatch.config import BatchConfig, cpu_cores
from dfbatch.plan import balance, balance_ratio, pack
from dfbatch.plan._tokens import count_tokens, get_counter, seed_tiktoken_cache

CHUNK = 1 << 16  # texts per encode_ordinary_batch call (bounds memory), as dfbatch does
HEAD_CHUNKS = 3  # the tiktoken-only dfbatch run is timed on the first 3 chunks only
MODULES = (
    "argparse asyncio collections contextlib dataclasses datetime decimal email enum fractions "
    "functools http.client inspect itertools json logging os pathlib pickle random re shutil "
    "socket sqlite3 statistics string subprocess tarfile threading typing unittest urllib.request "
    "zipfile"
).split()


def corpus() -> str:
    """Docstrings of a fixed list of stdlib modules and their members: English prose and code."""
    docs: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            module = importlib.import_module(name)
            for obj in [module, *(vars(module)[k] for k in sorted(vars(module)))]:
                doc = getattr(obj, "__doc__", None)
                if isinstance(doc, str) and len(doc) > 40:
                    docs.append(doc)
    return "\n\n".join(dict.fromkeys(docs))


def synthetic_texts(rows: int, median_chars: float, sigma: float, dup: float) -> list[str]:
    """Lognormal-length slices of the corpus starting at word boundaries; ``dup`` are repeats."""
    text = corpus()
    rng = np.random.default_rng(12345)
    spaces = np.flatnonzero(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32) == 32)
    lengths = np.clip(rng.lognormal(np.log(median_chars), sigma, rows), 1, 20_000).astype(int)
    starts = spaces[rng.integers(0, len(spaces) - 1, rows)] + 1
    starts = np.minimum(starts, len(text) - lengths)
    out = [text[s : s + k] for s, k in zip(starts.tolist(), lengths.tolist(), strict=True)]
    repeat = np.flatnonzero(rng.random(rows) < dup)
    source = rng.integers(0, max(1, rows // 1000), len(repeat))  # a pool of popular texts
    for i, j in zip(repeat.tolist(), source.tolist(), strict=True):
        out[i] = out[j]
    return out


def timed(fn, *args, **kwargs):
    """``(result, wall seconds, CPU seconds of all threads)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def raw_tiktoken(texts: list[str], encoding: str, head: int) -> tuple[np.ndarray, float, float]:
    """Counts of all texts, plus wall / CPU seconds spent on the first ``head`` texts."""
    import tiktoken

    enc = tiktoken.get_encoding(encoding)
    out = np.empty(len(texts), dtype=np.uint32)
    wall, cpu = time.perf_counter(), time.process_time()
    head_wall = head_cpu = 0.0
    for start in range(0, len(texts), CHUNK):
        ids = enc.encode_ordinary_batch(texts[start : start + CHUNK], num_threads=cpu_cores())
        out[start : start + len(ids)] = [len(x) for x in ids]
        if start + CHUNK == head:
            head_wall, head_cpu = time.perf_counter() - wall, time.process_time() - cpu
    return out, head_wall, head_cpu


def line(label: str, mb: float, wall: float, cpu: float, base_wall: float, extra: str = "") -> str:
    return (
        f"  {label:<44}{wall:7.2f}s wall {cpu:7.2f}s cpu {mb / wall:8.1f} MB/s "
        f"{base_wall / wall:6.2f}x{extra}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--median-chars", type=float, default=80.0)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--dup", type=float, default=0.10, help="share of repeated texts")
    parser.add_argument("--encoding", default="cl100k_base")
    parser.add_argument("--items-per-batch", type=int, default=4)
    parser.add_argument("--token-limit", type=int, default=32_768)
    args = parser.parse_args()

    texts, t_gen, _ = timed(synthetic_texts, args.rows, args.median_chars, args.sigma, args.dup)
    series = pl.Series("text", texts)
    mb = series.str.len_bytes().sum() / 1e6
    print(
        f"rows: {len(texts):,}  text: {mb:,.1f} MB  distinct: {series.n_unique() / len(texts):.1%}"
    )
    print(f"(generated in {t_gen:.1f}s; {cpu_cores()} cores; wall times are shared-machine times,")
    print(" cpu = CPU seconds of all threads, steadier when other jobs run)")

    seed_tiktoken_cache()
    get_counter(args.encoding), get_counter(args.encoding, fast=False)  # load outside the timers
    head = min(len(texts), HEAD_CHUNKS * CHUNK)
    (raw, head_wall, head_cpu), t_raw, c_raw = timed(raw_tiktoken, texts, args.encoding, head)
    print(f"\n[token counting, {args.encoding}, all {len(texts):,} rows]")
    print(line("raw tiktoken.encode_ordinary_batch", mb, t_raw, c_raw, t_raw))
    counts, t_default, c = timed(count_tokens, series, args.encoding)
    t = t_default
    same = f"  identical: {np.array_equal(counts.to_numpy(), raw)}"
    backend = get_counter(args.encoding).backend
    print(line(f"dfbatch count_tokens [{backend}]", mb, t, c, t_raw, same))

    sub = series.head(head)
    sub_mb = sub.str.len_bytes().sum() / 1e6
    print(f"\n[first {head:,} rows, {sub.n_unique() / head:.1%} distinct: dedup, same tokenizer]")
    if head_wall == 0.0:
        head_wall, head_cpu = t_raw, c_raw
    print(line("raw tiktoken.encode_ordinary_batch", sub_mb, head_wall, head_cpu, head_wall))
    counts, t, c = timed(count_tokens, sub, args.encoding, fast=False)
    same = f"  identical: {np.array_equal(counts.to_numpy(), raw[:head])}"
    print(line("dfbatch count_tokens [tiktoken, dedup]", sub_mb, t, c, head_wall, same))

    cfg = BatchConfig(items_per_batch=args.items_per_batch, token_limit=args.token_limit)
    costs = raw.astype(np.int64)
    batch, t_pack, _ = timed(pack, costs, cfg.items_per_batch, cfg.token_limit)
    weights = cfg.request_weight + np.bincount(batch, weights=costs)
    agents, t_bal, _ = timed(balance, weights, cfg.n_agents)
    share = (t_pack + t_bal) / t_raw
    print("\n[packing + balancing]")
    floor = -(-len(texts) // cfg.items_per_batch)
    print(f"  batches: {len(weights):,} (rows / items_per_batch = {floor:,})")
    print(f"  pack {t_pack * 1e3:.0f} ms + balance {t_bal * 1e3:.0f} ms = {share:.2%} of raw")
    print(f"  tiktoken counting time (goal <= 5%): {'OK' if share <= 0.05 else 'MISSED'}")
    print(f"  ({(t_pack + t_bal) / t_default:.1%} of dfbatch's own counting time, {backend})")

    print("\n[balance ratio: heaviest agent / max(total / agents, heaviest batch), goal <= 1.01]")
    for n_agents in sorted({cfg.n_agents, 8, 32, 256}):
        a = agents if n_agents == cfg.n_agents else balance(weights, n_agents)
        print(f"  {n_agents:4d} agents: {balance_ratio(weights, a, n_agents):.5f}")

    frame = pl.DataFrame({"text": series})
    planned, t_plan, _ = timed(dfbatch.plan, frame, config=cfg)
    print(f"\n[dfbatch.plan end to end, default counter]: {t_plan:.2f}s")
    print(dfbatch.summary(planned, config=cfg))


if __name__ == "__main__":
    main()
