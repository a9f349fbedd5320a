"""Offline tiktoken data, counters (tiktoken, toktok, callables), count_tokens and truncate."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from dfbatch.errors import TokenizerError
from dfbatch.plan import _encodings as encodings
from dfbatch.plan._tokens import count_tokens, get_counter, seed_tiktoken_cache, truncate

URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
CANONICAL = ("cl100k_base", "o200k_base")

VARIED = [
    "",
    " ",
    "hello world",
    "Hello, World! How's it going? I'm fine; they'll see.",
    "naïve café, déjà vu — “smart quotes” and ‘apostrophes’ ½ ∑ ∞ ≠ ≤",
    "emoji 😀😃😄 family 👩‍👩‍👧‍👦 skin 👍🏽 flags 🇫🇷🇯🇵🇺🇸 keycap 1️⃣ brain 🧠",
    "中文文本测试，日本語のテキスト、한국어 텍스트입니다。",
    "العربية עברית हिन्दी ภาษาไทย Ελληνικά русский ქართული",
    "   many    spaces\t\ttabs\n\n\n\nnewlines\r\n\r\ncrlf   ",
    " " * 300,
    "\n" * 100,
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)",
    'SELECT * FROM t WHERE x IN (1, 2, 3) AND y = "z"; -- comment\n{"a": [1, 2.5e-3, null]}',
    "control \x00\x01\x02\x07\x08\x0b\x0c\x1b[31mred\x1b[0m\x7f\u200b\u200d\ufeff end",
    "numbers 1234567890 3.14159 1,000,000 2024-01-01T12:34:56Z 0xDEADBEEF",
    "<|endoftext|> <|fim_prefix|> special tokens as plain text",
    "e\u0301 combining marks a\u0308o\u0308u\u0308 and NFC é ä",
    "\ud7ff\ue000\U0001f600\U0010fffd edge code points",
    "x" * 10_000,
    ("The quick brown fox jumps over the lazy dog. " * 230)[:10_000],
    "".join(chr(c) for c in range(32, 2000) if not 0xD800 <= c <= 0xDFFF),
    "🧠" * 3000,
]


def tiktoken_counts(name: str, texts: list[str]) -> list[int]:
    seed_tiktoken_cache()
    enc = tiktoken.get_encoding(name)
    return [len(enc.encode_ordinary(t)) for t in texts]


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A fresh, empty TIKTOKEN_CACHE_DIR that dfbatch has not seeded yet."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(encodings, "_seeded_dirs", set())
    return cache


# -- offline seeding -----------------------------------------------------------------------
def test_seed_writes_tiktoken_cache_files_with_expected_hashes(fresh_cache):
    expected = encodings._expected_files()
    assert seed_tiktoken_cache() == str(fresh_cache)
    for name in CANONICAL:
        path = fresh_cache / hashlib.sha1(URL.format(name).encode()).hexdigest()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == expected[name][1]
    assert not list(fresh_cache.glob("*.tmp"))


def test_expected_hashes_come_from_tiktoken_source():
    expected = encodings._expected_files()
    assert expected["cl100k_base"] == (
        URL.format("cl100k_base"),
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    )
    assert expected["o200k_base"][0] == URL.format("o200k_base")


def test_seed_is_idempotent_and_repairs_a_corrupt_file(fresh_cache, monkeypatch):
    seed_tiktoken_cache()
    path = fresh_cache / hashlib.sha1(URL.format("cl100k_base").encode()).hexdigest()
    before = path.stat().st_mtime_ns
    monkeypatch.setattr(encodings, "_seeded_dirs", set())
    seed_tiktoken_cache()
    assert path.stat().st_mtime_ns == before  # valid file left alone
    path.write_bytes(b"garbage")
    monkeypatch.setattr(encodings, "_seeded_dirs", set())
    seed_tiktoken_cache()
    expected = encodings._expected_files()["cl100k_base"][1]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == expected


def test_seed_is_thread_safe(fresh_cache):
    errors: list[BaseException] = []

    def work() -> None:
        try:
            seed_tiktoken_cache()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(list(fresh_cache.iterdir())) == 2


def test_seed_sets_cache_env_only_when_unset(tmp_path, monkeypatch):
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        monkeypatch.setenv(var, "placeholder")  # so that monkeypatch restores the original
        monkeypatch.delenv(var)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(encodings, "_seeded_dirs", set())
    cache = seed_tiktoken_cache()
    assert cache == str(tmp_path / "xdg" / "dfbatch" / "tiktoken")
    assert os.environ["TIKTOKEN_CACHE_DIR"] == cache
    assert len(os.listdir(cache)) == 2


def test_seed_uses_data_gym_dir_when_that_is_what_tiktoken_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "placeholder")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "gym"))
    monkeypatch.setattr(encodings, "_seeded_dirs", set())
    assert seed_tiktoken_cache() == str(tmp_path / "gym")
    assert "TIKTOKEN_CACHE_DIR" not in os.environ
    assert len(os.listdir(tmp_path / "gym")) == 2


OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, socket

    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    socket.socket.connect = no_network
    socket.create_connection = no_network

    import polars as pl
    import tiktoken
    from dfbatch.plan._tokens import count_tokens, get_counter

    texts = ["hello world", "", "naïve 🧠 汉字"]
    out = {
        "cl100k_dfbatch": count_tokens(pl.Series(texts), "cl100k_base", fast=False).to_list(),
        "o200k_model": get_counter("gpt-4o", fast=False)(texts).tolist(),
        "cl100k_ids": tiktoken.get_encoding("cl100k_base").encode("hello world"),
        "o200k_ids": tiktoken.get_encoding("o200k_base").encode("hello world"),
    }
    print(json.dumps(out))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("set_cache_dir", [True, False])
def test_canonical_encodings_work_with_networking_impossible(tmp_path, set_cache_dir):
    env = {
        k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")
    }
    dead = "http://127.0.0.1:9"
    env |= {"HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead, "https_proxy": dead}
    env |= {"NO_PROXY": "", "no_proxy": "", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    if set_cache_dir:
        env["TIKTOKEN_CACHE_DIR"] = str(tmp_path / "empty-cache")
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cl100k_ids"] == [15339, 1917]  # the well-known ids of "hello world"
    assert out["o200k_ids"] == [24912, 2375]
    assert out["cl100k_dfbatch"][:2] == [2, 0]
    assert out["o200k_model"][0] == 2
    assert out["cl100k_dfbatch"][2] == tiktoken_counts("cl100k_base", ["naïve 🧠 汉字"])[0]
    cache = tmp_path / ("empty-cache" if set_cache_dir else "xdg/dfbatch/tiktoken")
    assert len(list(cache.iterdir())) == 2


# -- counters ------------------------------------------------------------------------------
def test_unknown_encoding_is_a_clear_error_with_hint():
    with pytest.raises(TokenizerError, match=r"cl100k_bas.*did you mean 'cl100k_base'"):
        get_counter("cl100k_bas")
    with pytest.raises(TokenizerError, match="encoding name, a model name or a callable"):
        get_counter(42)  # type: ignore[arg-type]


def test_model_name_resolves_to_its_encoding():
    assert get_counter("gpt-4o", fast=False).name == "o200k_base"
    assert get_counter("gpt-4", fast=False).name == "cl100k_base"


def test_counters_are_cached_per_spec():
    assert get_counter("cl100k_base", fast=False) is get_counter("cl100k_base", fast=False)


@pytest.mark.parametrize("name", CANONICAL)
def test_tiktoken_counter_matches_encode_ordinary(name):
    counts = get_counter(name, fast=False)(VARIED)
    assert counts.dtype == np.uint32
    assert counts.tolist() == tiktoken_counts(name, VARIED)


@pytest.mark.parametrize("name", CANONICAL)
def test_fast_counter_equals_tiktoken_on_varied_text(name):
    pytest.importorskip("toktok")
    fast = get_counter(name, fast=True)
    assert fast.backend == "toktok"
    assert fast(VARIED).tolist() == tiktoken_counts(name, VARIED)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=200), min_size=1, max_size=10))
def test_fast_counter_equals_tiktoken_on_random_text(texts):
    pytest.importorskip("toktok")
    for name in CANONICAL:
        assert get_counter(name, fast=True)(texts).tolist() == tiktoken_counts(name, texts)


def test_fast_counter_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("DFBATCH_FAST_TOKENS", "0")
    assert get_counter("cl100k_base").backend == "tiktoken"
    assert get_counter("cl100k_base", fast=False).backend == "tiktoken"


def test_callable_counter_output_is_validated():
    def two(texts):
        return [1, 2]

    with pytest.raises(TokenizerError, match=r"two returned 2 counts for 3 texts"):
        get_counter(two)(["a", "b", "c"])
    with pytest.raises(TokenizerError, match=r"returned NoneType None for 1 texts"):
        get_counter(lambda texts: None)(["a"])
    with pytest.raises(TokenizerError, match="outside"):
        get_counter(lambda texts: [-1] * len(texts))(["a"])
    with pytest.raises(TokenizerError, match="fraction"):
        get_counter(lambda texts: [0.5] * len(texts))(["a"])
    with pytest.raises(TokenizerError, match="expected non-negative ints"):
        get_counter(lambda texts: ["x"] * len(texts))(["a"])
    ok = get_counter(lambda texts: pl.Series([len(t) for t in texts]))(["ab", ""])
    assert ok.dtype == np.uint32
    assert ok.tolist() == [2, 0]


# -- count_tokens --------------------------------------------------------------------------
def test_count_tokens_counts_each_distinct_text_once():
    seen: list[list[str]] = []

    def spy(texts):
        seen.append(list(texts))
        return [len(t) for t in texts]

    s = pl.Series("t", ["aa", None, "aa", "bbb", "", "bbb", None])
    out = count_tokens(s, spy)
    assert out.dtype == pl.UInt32
    assert out.name == "t"
    assert out.to_list() == [2, 0, 2, 3, 0, 3, 0]
    assert len(seen) == 1
    assert sorted(seen[0]) == ["", "aa", "bbb"]


def test_count_tokens_empty_and_all_null():
    assert count_tokens(pl.Series("t", [], dtype=pl.String), "cl100k_base").to_list() == []
    out = count_tokens(pl.Series("t", [None, None]), "cl100k_base")
    assert out.dtype == pl.UInt32
    assert out.to_list() == [0, 0]


def test_count_tokens_rejects_non_strings():
    with pytest.raises(TokenizerError, match=r"dtype Int64.*cast"):
        count_tokens(pl.Series("n", [1, 2]), "cl100k_base")


def test_count_tokens_real_text_equals_tiktoken():
    s = pl.Series("t", [*VARIED, None, VARIED[3]])
    expected = [
        *tiktoken_counts("cl100k_base", VARIED),
        0,
        tiktoken_counts("cl100k_base", [VARIED[3]])[0],
    ]
    assert count_tokens(s, "cl100k_base").to_list() == expected


# -- truncate ------------------------------------------------------------------------------
@pytest.mark.parametrize("fast", [False, True])
def test_truncate_cuts_to_budget_on_character_boundaries(fast):
    texts = ["short", None, "🧠" * 50, "word " * 100, "naïve 汉字 " * 40]
    out = truncate(pl.Series("t", texts), 10, "cl100k_base", fast=fast)
    assert out.name == "t"
    counts = tiktoken_counts("cl100k_base", [t for t in out.to_list() if t is not None])
    assert max(counts) <= 10
    for before, after in zip(texts, out.to_list(), strict=True):
        if before is None:
            assert after is None
        else:
            assert before.startswith(after)
            assert (
                after == before
                or tiktoken_counts("cl100k_base", [before[: len(after) + 1]])[0] > 10
            )
    assert out[0] == "short"


def test_truncate_rejects_bad_budget():
    with pytest.raises(TokenizerError, match="max_tokens"):
        truncate(pl.Series(["a"]), -1)


def test_bundled_data_location_exists():
    files = encodings._bundled_files()
    assert {"cl100k_base", "o200k_base"} <= set(files)
    assert all(isinstance(p, Path) and p.exists() for p in files.values())


def test_a_callable_counter_gets_the_texts_a_chunk_at_a_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A million distinct texts never become one Python list (memory): the counter is called
    per chunk, and the counts still land on the right rows across chunk boundaries."""
    from dfbatch.plan import _tokens

    monkeypatch.setattr(_tokens, "_CHUNK", 3)
    calls: list[int] = []

    def count(texts: list[str]) -> list[int]:
        calls.append(len(texts))
        return [len(t) for t in texts]

    texts = pl.Series("t", ["a", "bb", None, "ccc", "dddd", "a", "eeeee", "ffffff", "ggggggg"])
    got = count_tokens(texts, count).to_list()
    assert got == [0 if t is None else len(t) for t in texts.to_list()]
    assert max(calls) <= 3 and sum(calls) == 7  # 7 distinct texts, at most 3 a call
    calls.clear()
    calls.clear()
    distinct = pl.Series("t", [None, *(str(i) for i in range(10))])
    monkeypatch.setattr(_tokens, "_CHUNK", 20)
    assert count_tokens(distinct, count).to_list() == [0] + [len(str(i)) for i in range(10)]
    assert calls == [10]  # a small column: its distinct texts (all 10), in one call
    calls.clear()
    monkeypatch.setattr(_tokens, "_CHUNK", 4)
    assert count_tokens(distinct, count).to_list() == [0] + [len(str(i)) for i in range(10)]
    assert calls == [3, 4, 3]  # over a chunk and hardly repeating: counted in place
