"""Planning: packing, balancing, the plan columns, bad input, lazy frames and the summary."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import tiktoken
from hypothesis import example, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

import dfbatch
from dfbatch import BatchConfig, ColumnError, Columns, ConfigError
from dfbatch.plan import (
    balance,
    balance_ratio,
    pack,
    plan,
    summary,
)
from dfbatch.plan._plan import NULL_TEXT, OVERSIZE
from dfbatch.plan._tokens import seed_tiktoken_cache


def chars(texts: list[str]) -> list[int]:
    """A fast fake tokenizer: one token per character."""
    return [len(t) for t in texts]


def lognormal_texts(n: int, seed: int, sigma: float = 1.0) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.lognormal(5.0, sigma, n).astype(int), 20_000)
    return ["x" * int(k) for k in lengths]


def check_plan(planned: pl.DataFrame, texts: list[str | None], cfg: BatchConfig) -> None:
    """Every invariant a plan promises, checked on the result frame."""
    c = cfg.columns
    limit = cfg.token_limit
    assert planned.schema[c.n_tokens] == pl.UInt32
    assert planned.schema[c.batch_id] == pl.UInt32
    assert planned.schema[c.agent_id] == pl.UInt16
    assert planned.schema[c.flag] == pl.String
    assert planned.height == len(texts)
    n = [0 if t is None else len(t) for t in texts]
    assert planned[c.n_tokens].to_list() == n
    cost = [k + cfg.output_tokens_per_row for k in n]
    expected_flags = [
        NULL_TEXT if not t else OVERSIZE if cfg.request_overhead_tokens + k > limit else None
        for t, k in zip(texts, cost, strict=True)
    ]
    assert planned[c.flag].to_list() == expected_flags
    batch = planned[c.batch_id].to_numpy()
    if len(batch) == 0:
        return
    n_batches = int(batch.max()) + 1
    # ids are 0..B-1, numbered by each batch's first row: first occurrences are increasing
    _, first = np.unique(batch, return_index=True)
    assert len(first) == n_batches
    assert np.all(np.diff(first) > 0)
    per_batch = planned.group_by(c.batch_id).agg(
        pl.len().alias("rows"),
        (pl.col(c.n_tokens).cast(pl.Int64) + cfg.output_tokens_per_row).sum().alias("tokens"),
        (pl.col(c.flag) == OVERSIZE).sum().alias("oversize"),
        pl.col(c.agent_id).n_unique().alias("agents"),
    )
    assert per_batch["rows"].max() <= cfg.items_per_batch  # type: ignore[operator]
    request = per_batch["tokens"] + cfg.request_overhead_tokens
    alone_oversize = (per_batch["rows"] == 1) & (per_batch["oversize"] == 1)
    assert ((request <= limit) | alone_oversize).all()
    assert (per_batch.filter(pl.col("oversize") > 0)["rows"] == 1).all()
    assert (per_batch["agents"] == 1).all()
    assert planned[c.agent_id].max() < cfg.n_agents  # type: ignore[operator]


texts_strategy = st.lists(
    st.one_of(st.none(), st.integers(0, 60).map(lambda k: "y" * k)), min_size=0, max_size=80
)


@settings(max_examples=120, deadline=None)
@given(
    texts=texts_strategy,
    ipb=st.integers(1, 6),
    limit=st.integers(1, 120),
    overhead=st.integers(0, 10),
    out=st.integers(0, 10),
    agents=st.integers(1, 9),
    request_weight=st.integers(0, 300),
)
def test_plan_invariants(texts, ipb, limit, overhead, out, agents, request_weight):
    kwargs = dict(
        items_per_batch=ipb,
        token_limit=limit,
        request_overhead_tokens=overhead,
        output_tokens_per_row=out,
        agents=agents,
        request_weight=request_weight,
        encoding=chars,
    )
    df = pl.DataFrame({"text": texts}, schema={"text": pl.String})
    if overhead + out >= limit:
        with pytest.raises(ConfigError, match="leave no room"):
            plan(df, **kwargs)
        return
    planned = plan(df, **kwargs)
    check_plan(planned, texts, BatchConfig(**kwargs))
    assert_frame_equal(planned, plan(df, **kwargs))  # deterministic
    assert_frame_equal(plan(df.lazy(), **kwargs).collect(), planned)  # lazy == eager


@st.composite
def pack_inputs(draw: st.DrawFn) -> tuple[list[int], int, int]:
    """Costs on the scale of the limit: small rows, big rows and oversize rows mixed."""
    ipb = draw(st.integers(1, 40))
    limit = draw(st.integers(1, 1_200))
    small = st.integers(0, limit // ipb + 1)
    any_size = st.integers(0, 2 * limit)
    costs = draw(st.lists(st.one_of(small, small, any_size), max_size=200))
    return costs, ipb, limit


@settings(max_examples=200, deadline=None)
@given(pack_inputs())
@example(([60, 10, 25, 25], 4, 100))  # a big row, then small rows that fit its slots one by one
def test_pack_invariants_and_batch_count_bound(inputs):
    costs, ipb, limit = inputs
    c = np.array(costs, dtype=np.int64)
    batch = pack(c, ipb, limit)
    assert batch.dtype == np.uint32
    assert len(batch) == len(c)
    if len(c) == 0:
        return
    n_batches = int(batch.max()) + 1
    rows = np.bincount(batch, minlength=n_batches)
    tokens = np.bincount(batch, weights=c, minlength=n_batches)
    assert rows.min() >= 1
    assert rows.max() <= ipb
    over = c > limit
    assert np.all((tokens <= limit) | (rows == 1))
    assert np.all(rows[batch[over]] == 1)  # oversize rows are alone
    _, first = np.unique(batch, return_index=True)
    assert np.all(np.diff(first) > 0)
    # proven bound of the size-class scheme: full big-row batches carry > limit / 2 tokens
    fit = c[~over]
    bound = 2 * -(-int(fit.sum()) // limit) + -(-len(fit) // ipb) + ipb + int(over.sum())
    assert n_batches <= bound
    assert np.array_equal(pack(c, ipb, limit), batch)


def test_pack_fills_free_slots_of_big_row_batches():
    # two rows that fit one per batch leave room for many small rows
    costs = [60, 1, 1, 1, 60, 1, 1, 1]
    batch = pack(costs, 4, 100)
    assert int(batch.max()) + 1 == 2


@settings(max_examples=150, deadline=None)
@given(
    weights=st.lists(st.integers(0, 10_000), max_size=300),
    agents=st.integers(1, 40),
)
def test_balance_assigns_every_batch_within_greedy_bound(weights, agents):
    w = np.array(weights, dtype=np.float64)
    a = balance(w, agents)
    assert len(a) == len(w)
    if len(w) == 0:
        return
    assert a.max() < agents
    loads = np.bincount(a, weights=w, minlength=agents)
    assert loads.max() <= w.sum() / agents + w.max() + 1e-6  # list scheduling's guarantee
    assert balance_ratio(w, a, agents) >= 1 - 1e-9
    assert np.array_equal(balance(w, agents), a)


@pytest.mark.parametrize("agents", [1, 2, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.5])
def test_balance_within_one_percent_on_realistic_workloads(agents, seed, sigma):
    texts = lognormal_texts(10_000, seed, sigma)
    cfg = dict(encoding=chars, agents=agents, output_tokens_per_row=50)
    planned = plan(pl.DataFrame({"text": texts}), **cfg)
    s = summary(planned, **cfg)
    assert s.balance_ratio <= 1.01
    assert s.batches <= -(-10_000 // 4) + 4


def test_balance_rejects_bad_input():
    with pytest.raises(ConfigError, match="n_agents"):
        balance([1.0], 0)
    with pytest.raises(ConfigError, match="weights"):
        balance([-1.0], 2)
    with pytest.raises(ConfigError, match="costs"):
        pack([-1], 2, 10)
    with pytest.raises(ConfigError, match="limit"):
        pack([1], 2, 0)


# -- the plan frame ------------------------------------------------------------------------
def test_plan_with_real_tiktoken_counts_unicode_and_control_chars():
    texts = ["hello world", "naïve 🧠 👩‍👩‍👧‍👦 汉字", "\x00\x1b[31m\t\r\n", "   ", None, ""]
    planned = plan(pl.DataFrame({"text": texts}), items_per_batch=2, agents=3)
    seed_tiktoken_cache()
    enc = tiktoken.get_encoding("cl100k_base")
    expected = [0 if t is None else len(enc.encode_ordinary(t)) for t in texts]
    assert planned["n_tokens"].to_list() == expected
    assert planned["plan_flag"].to_list() == [None, None, None, None, NULL_TEXT, NULL_TEXT]
    assert planned["batch_id"].to_list() == [0, 0, 1, 1, 2, 2]


@settings(max_examples=15, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text(max_size=60)), max_size=20), st.integers(1, 5))
def test_plan_invariants_with_real_tokenizer(texts, ipb):
    planned = plan(
        pl.DataFrame({"text": texts}, schema={"text": pl.String}),
        items_per_batch=ipb,
        token_limit=25,
        agents=3,
        encoding="o200k_base",
    )
    enc = tiktoken.get_encoding("o200k_base")
    n = [0 if t is None else len(enc.encode_ordinary(t)) for t in texts]
    assert planned["n_tokens"].to_list() == n
    per_batch = planned.group_by("batch_id").agg(pl.len(), pl.col("n_tokens").sum())
    assert ((per_batch["n_tokens"] <= 25) | (per_batch["len"] == 1)).all()
    assert (per_batch["len"] <= ipb).all()


def test_plan_of_a_one_megabyte_string_flags_it_oversize():
    big = "lorem ipsum dolor sit amet " * 40_000  # ~1 MB
    planned = plan(pl.DataFrame({"text": ["small", big, "tiny"]}), agents=2)
    assert planned["plan_flag"].to_list() == [None, OVERSIZE, None]
    assert planned["n_tokens"][1] > 32_768
    assert planned["batch_id"].to_list() == [0, 1, 0]


def test_empty_frame_gives_an_empty_plan_with_the_right_dtypes():
    for df in (pl.DataFrame({"text": []}, schema={"text": pl.String}), pl.DataFrame({"text": []})):
        planned = plan(df, agents=2)
        assert planned.height == 0
        assert planned.schema == pl.Schema(
            {
                "text": df.schema["text"],
                "n_tokens": pl.UInt32,
                "batch_id": pl.UInt32,
                "agent_id": pl.UInt16,
                "plan_flag": pl.String,
            }
        )
        assert plan(df.lazy(), agents=2).collect().schema == planned.schema
    s = summary(plan(pl.DataFrame({"text": []}, schema={"text": pl.String})))
    assert (s.rows, s.batches, s.tokens, s.balance_ratio) == (0, 0, 0, 1.0)


def test_all_null_column_is_a_valid_plan():
    df = pl.DataFrame({"text": [None, None, None]})
    assert df.schema["text"] == pl.Null
    planned = plan(df, items_per_batch=2, agents=2)
    assert planned["plan_flag"].to_list() == [NULL_TEXT] * 3
    assert planned["n_tokens"].to_list() == [0, 0, 0]
    assert planned["batch_id"].to_list() == [0, 0, 1]


def test_non_string_column_names_dtype_and_fix():
    df = pl.DataFrame({"text": [1, 2]})
    with pytest.raises(ConfigError, match=r"dtype Int64.*cast\(pl\.Utf8\)"):
        plan(df)
    planned = plan(df, pl.col("text").cast(pl.Utf8), encoding=chars)
    assert planned["n_tokens"].to_list() == [1, 1]


def test_categorical_text_is_counted_as_strings():
    df = pl.DataFrame({"text": ["ab", "abc", "ab"]}, schema={"text": pl.Categorical})
    assert plan(df, encoding=chars)["n_tokens"].to_list() == [2, 3, 2]


def test_missing_column_has_a_did_you_mean_hint():
    df = pl.DataFrame({"text": ["a"], "id": [1]})
    with pytest.raises(ColumnError, match=r"'txt' not found.*did you mean 'text'"):
        plan(df, "txt")
    with pytest.raises(ColumnError, match=r"missing column.*did you mean 'text'"):
        plan(df, pl.col("txet").str.to_uppercase())
    with pytest.raises(ColumnError, match="did you mean 'text'"):
        plan(df.lazy(), "texts")  # raised at plan time, not at collect


def test_text_expression():
    df = pl.DataFrame({"title": ["ab", None], "body": ["cde", "f"]})
    planned = plan(df, pl.concat_str("title", "body", separator=" "), encoding=chars)
    assert planned["n_tokens"].to_list() == [6, 0]
    assert planned["plan_flag"].to_list() == [None, NULL_TEXT]
    assert planned.columns[:2] == ["title", "body"]
    constant = plan(df, pl.lit("four"), encoding=chars)
    assert constant["n_tokens"].to_list() == [4, 4]
    with pytest.raises(ConfigError, match="one column"):
        plan(df, pl.col("title", "body"))
    with pytest.raises(ConfigError, match="column name or a polars expression"):
        plan(df, 3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="DataFrame or LazyFrame"):
        plan({"text": ["a"]})  # type: ignore[type-var]


def test_clashing_columns_say_how_to_rename_and_are_never_overwritten():
    df = pl.DataFrame({"text": ["a"], "n_tokens": ["mine"]})
    with pytest.raises(ColumnError, match=r"'n_tokens' already exists.*Columns\(n_tokens="):
        plan(df)
    planned = plan(df, columns=Columns(n_tokens="n_tok"), encoding=chars)
    assert planned["n_tokens"].to_list() == ["mine"]
    assert planned["n_tok"].to_list() == [1]
    with pytest.raises(ColumnError, match=r"'plan_flag'.*Columns\(flag="):
        plan(pl.DataFrame({"text": ["a"], "plan_flag": [1]}))


def test_planning_twice_is_an_error():
    planned = plan(pl.DataFrame({"text": ["a", "b"]}), encoding=chars)
    with pytest.raises(ColumnError, match="already planned"):
        plan(planned, encoding=chars)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"items_per_batch": 0}, "items_per_batch must be an integer > 0"),
        ({"items_per_batch": -3}, "items_per_batch"),
        ({"items_per_batch": True}, "items_per_batch"),
        ({"token_limit": 0}, "token_limit must be an integer > 0"),
        ({"token_limit": 10**12}, "absurdly large"),
        ({"agents": 0}, "agents must be an integer > 0"),
        ({"agents": 70_000}, "absurdly large"),
        ({"request_overhead_tokens": -1}, "request_overhead_tokens"),
        ({"output_tokens_per_row": 2.5}, "output_tokens_per_row"),
        ({"token_limit": 100, "request_overhead_tokens": 100}, "leave no room"),
        ({"token_limit": 100, "output_tokens_per_row": 60, "request_overhead_tokens": 40}, "room"),
        ({"items_per_bach": 2}, "did you mean 'items_per_batch'"),
        ({"encoding": 3}, "encoding must be"),
    ],
)
def test_bad_config_values_are_clear_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        plan(pl.DataFrame({"text": ["a"]}), **kwargs)


def test_unknown_encoding_in_plan_is_a_tokenizer_error():
    with pytest.raises(dfbatch.TokenizerError, match="did you mean 'o200k_base'"):
        plan(pl.DataFrame({"text": ["a"]}), encoding="o200k_bse")


def test_overhead_and_output_tokens_count_against_the_limit_but_not_n_tokens():
    df = pl.DataFrame({"text": ["x" * 10] * 4})
    planned = plan(
        df, encoding=chars, token_limit=50, request_overhead_tokens=20, output_tokens_per_row=5
    )
    assert planned["n_tokens"].to_list() == [10] * 4
    assert planned["batch_id"].to_list() == [0, 0, 1, 1]  # 20 + 2 x 15 = 50 per batch


def test_lazy_plan_returns_a_lazyframe_equal_to_eager():
    df = pl.DataFrame({"text": lognormal_texts(500, 3), "k": range(500)})
    df = pl.concat([df.head(200), df.tail(300)], rechunk=False)  # two chunks
    lazy = dfbatch.plan(df.lazy(), encoding=chars, agents=5)
    assert isinstance(lazy, pl.LazyFrame)
    assert lazy.collect_schema()["agent_id"] == pl.UInt16
    assert_frame_equal(lazy.collect(), dfbatch.plan(df, encoding=chars, agents=5))
    filtered = lazy.filter(pl.col("k") < 100).collect()
    eager = dfbatch.plan(df, encoding=chars, agents=5).filter(pl.col("k") < 100)
    assert_frame_equal(filtered, eager)  # filters are not pushed below the plan


def test_namespace_forwards_to_plan_and_summary():
    df = pl.DataFrame({"text": ["a", "bb", "ccc"]})
    planned = df.batch.plan(encoding=chars, agents=2, items_per_batch=2)
    assert_frame_equal(planned, plan(df, encoding=chars, agents=2, items_per_batch=2))
    assert df.lazy().batch.plan(encoding=chars).collect()["n_tokens"].to_list() == [1, 2, 3]
    assert planned.batch.summary(agents=2).rows == 3


# -- summary -------------------------------------------------------------------------------
def test_summary_figures_and_cost():
    texts = ["x" * 10, "x" * 20, None, "x" * 500, "x" * 30]
    cfg = BatchConfig(
        encoding=chars,
        items_per_batch=2,
        token_limit=100,
        request_overhead_tokens=10,
        output_tokens_per_row=5,
        agents=3,
        request_weight=7,
    )
    planned = plan(pl.DataFrame({"text": texts}), config=cfg)
    s = summary(planned, price_in_per_1k=2.0, price_out_per_1k=10.0, config=cfg)
    assert (s.rows, s.agents, s.null_text, s.oversize, s.flagged) == (5, 3, 1, 1, 2)
    assert s.tokens == 560
    assert s.batches == planned["batch_id"].n_unique()
    assert s.request_tokens == 10 * s.batches + 560 + 5 * 5
    loads = s.loads
    assert loads.columns == ["agent_id", "batches", "rows", "tokens", "load"]
    assert loads["agent_id"].to_list() == [0, 1, 2]
    assert loads["rows"].sum() == 5
    assert loads["batches"].sum() == s.batches
    assert loads["load"].sum() == 7 * s.batches + s.request_tokens
    weights = (loads["load"]).to_numpy()
    assert s.balance_ratio == pytest.approx(weights.max() / s.lower_bound)
    sent_batches = planned.filter(pl.col("plan_flag").fill_null("") != NULL_TEXT)["batch_id"]
    tokens_in = 560 + 10 * sent_batches.n_unique()
    assert s.cost_in == pytest.approx(tokens_in / 1000 * 2.0)
    assert s.cost_out == pytest.approx(4 * 5 / 1000 * 10.0)
    assert s.cost == pytest.approx(s.cost_in + s.cost_out)
    text = str(s)
    assert "5 rows" in text
    assert "1 null_text, 1 oversize" in text
    assert "est. cost" in text
    assert repr(s) == text
    assert summary(planned, config=cfg).cost is None
    assert "no price; pass price_in_per_1k=" in str(summary(planned, config=cfg))


def test_summary_agents_default_to_those_in_the_plan():
    planned = plan(pl.DataFrame({"text": ["a"] * 40}), encoding=chars, agents=3)
    assert summary(planned).agents == 3
    assert summary(planned, agents=5).loads.height == 5


def test_summary_of_an_unplanned_frame_says_to_plan_first():
    with pytest.raises(ColumnError, match=r"batch\.plan"):
        summary(pl.DataFrame({"text": ["a"]}))
