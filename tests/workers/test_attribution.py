"""Ticker attribution beyond US symbols: exchange ticker formats in `tickers` (schema and
dead letters), company names without word boundaries in CJK text, the dictionary."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.messages import TICKER_PATTERN, NewsItem, PoisonRecord, decode_news
from tests.properties import hypothesis_settings
from workers.sentiment_monitor.attribution import (
    CompanyName,
    TickerAttributor,
    package_listings,
    read_companies_csv,
)

T0 = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
ATTRIBUTOR = TickerAttributor.from_csv()
VALID = ["600519.SH", "000001.SZ", "0700.HK", "00700.HK", "7203.T", "130A.T", "VOD.L", "0YP5.L", "AAPL", "BRK.B", "F"]
INVALID = ["aapl", "$AAPL", "600519", "600519.XX", "6005.SH", "0700.H", "5M", "TOOLONGTICKER", "", "600519.sh"]


def item(headline: str, body: str | None = None, tickers: list[str] | None = None) -> NewsItem:
    return NewsItem(id="1", published_at=T0, source="wire", headline=headline, body=body, tickers=tickers or [])


def record(tickers: list[str]) -> bytes:
    document = {"id": "1", "published_at": "2026-11-24T09:00:00Z", "source": "s", "headline": "h", "tickers": tickers}
    return json.dumps(document).encode()


@pytest.mark.parametrize("ticker", VALID)
def test_exchange_tickers_are_valid_items(ticker: str) -> None:
    assert decode_news(record([ticker]), 1 << 20).tickers == [ticker]


@pytest.mark.parametrize("ticker", INVALID)
def test_a_bad_ticker_is_still_dead_lettered_as_schema(ticker: str) -> None:
    with pytest.raises(PoisonRecord) as caught:
        decode_news(record(["600519.SH", ticker]), 1 << 20)
    assert caught.value.reason == "schema"
    assert caught.value.detail.startswith("tickers.1:")


def test_the_published_json_schema_has_the_same_ticker_pattern() -> None:
    with open("docs/schemas/finance.news.v1.json", encoding="utf-8") as published:
        schema = json.load(published)
    assert schema["properties"]["tickers"]["items"]["pattern"] == TICKER_PATTERN


ticker_texts = st.from_regex(TICKER_PATTERN, fullmatch=True)


def test_generated_tickers_of_the_pattern_are_accepted_and_others_rejected() -> None:
    @hypothesis_settings(200)
    @given(ticker=ticker_texts, noise=st.text(max_size=12))
    def check(ticker: str, noise: str) -> None:
        assert decode_news(record([ticker]), 1 << 20).tickers == [ticker]
        if not re.fullmatch(TICKER_PATTERN, noise):
            with pytest.raises(PoisonRecord) as caught:
                decode_news(record([noise]), 1 << 20)
            assert caught.value.reason == "schema"

    check()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("贵州茅台股价大涨", ["600519.SH"]),  # the example: no boundary in CJK
        ("恒大集团债务违约，股价暴跌80%", ["3333.HK"]),
        ("宁德时代遭大股东减持，股价跌停", ["300750.SZ"]),
        ("腾讯控股与美团同日公布业绩", ["0700.HK", "3690.HK"]),
        ("京东方A发布公告", ["000725.SZ"]),  # the longer name wins over 京东 (JD)
        ("トヨタ自動車の株価が上昇", ["7203.T"]),
        ("苹果公司和特斯拉", ["AAPL", "TSLA"]),
        ("Apple和Tesla股价", ["AAPL", "TSLA"]),  # Latin names next to CJK characters
        ("metadata and metaverse stocks", []),  # Meta needs a word boundary
        ("Meta rallies; Meta's metadata", ["META"]),
        ("Bank of America slides", ["BAC"]),  # not America too
        ("Target prices rise at the next meeting", []),  # plain words of the listings
        ("TESLA RECALLS CARS", ["TSLA"]),  # all-caps headlines
        ("AbbVie and 3M rise; Public Storage falls", ["ABBV", "MMM", "PSA"]),  # from pytickersymbols
        ("Vodafone and Barclays lead the FTSE", ["BARC.L", "VOD.L"]),
    ],
)
def test_company_names_in_text(text: str, expected: list[str]) -> None:
    assert ATTRIBUTOR.tickers(item(text)) == expected


def test_cashtags_with_exchange_suffixes_and_next_to_cjk() -> None:
    text = "$TSLA股价下跌, $600519.SH 与 $0700.HK; $VOD.L up; $BRK.B; not $5M or $100"
    assert TickerAttributor({}).tickers(item(text)) == ["0700.HK", "600519.SH", "BRK.B", "TSLA", "VOD.L"]


def test_the_item_tickers_field_is_kept() -> None:
    assert ATTRIBUTOR.tickers(item("无关新闻", tickers=["600519.SH", "0700.HK"])) == ["0700.HK", "600519.SH"]


def test_the_previous_attribution_still_holds() -> None:
    news = item(
        "$tsla and Bank of America slide; $5M fine for a $BRK.B unit",
        body="Analysts at Goldman Sachs see more pain.",
        tickers=["AAPL"],
    )
    assert ATTRIBUTOR.tickers(news) == ["AAPL", "BAC", "BRK.B", "GS", "TSLA"]


names = st.sampled_from(["贵州茅台", "腾讯控股", "宁德时代", "Tesla", "Bank of America"])
expected_ticker = {
    "贵州茅台": "600519.SH",
    "腾讯控股": "0700.HK",
    "宁德时代": "300750.SZ",
    "Tesla": "TSLA",
    "Bank of America": "BAC",
}
cjk = st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=8)
spaced = st.text(st.characters(categories=["Zs", "Po", "Pd"]), min_size=1, max_size=3)


def test_generated_names_are_found_wherever_they_sit_in_chinese_text() -> None:
    @hypothesis_settings(200)
    @given(before=cjk, name=names, after=cjk, gap=spaced)
    def check(before: str, name: str, after: str, gap: str) -> None:
        # A CJK name needs no boundary; a Latin one needs a non-letter or a CJK neighbour.
        text = before + name + after if not name.isascii() else before + gap + name + gap + after
        found = {ticker for start, end, ticker in ATTRIBUTOR.company_names(text) if text[start:end] == name}
        assert expected_ticker[name] in found, text

    check()


def test_generated_latin_names_glued_to_latin_letters_are_never_found() -> None:
    attributor = TickerAttributor({"Meta": "META", "Apple": "AAPL"})

    @hypothesis_settings(200)
    @given(
        before=st.text("abcdefghijklmnopqrstuvwxyz0123456789_", max_size=5),
        name=st.sampled_from(["Meta", "Apple"]),
        after=st.text("abcdefghijklmnopqrstuvwxyz0123456789_", max_size=5),
    )
    def check(before: str, name: str, after: str) -> None:
        text = before + name + after
        assert attributor.company_names(text) == ([] if before or after else [(0, len(name), name_to(name))])

    def name_to(name: str) -> str:
        return {"Meta": "META", "Apple": "AAPL"}[name]

    check()


def test_matches_never_overlap_and_point_into_the_text() -> None:
    @hypothesis_settings(200)
    @given(text=st.text(st.sampled_from(list("京东方A集团贵州茅台腾讯 Bank of America")), max_size=40))
    def check(text: str) -> None:
        position = 0
        for start, end, _ in ATTRIBUTOR.company_names(text):
            assert position <= start < end <= len(text)
            position = end

    check()


def test_a_users_csv_with_aliases_replaces_the_default(tmp_path: Path) -> None:
    path = tmp_path / "companies.csv"
    path.write_text(
        "ticker,name,aliases\n600519.sh,贵州茅台,Kweichow Moutai,茅台\n0700.HK,Tencent,,\n\nAAPL,Apple\n",
        encoding="utf-8",
    )
    rows = read_companies_csv(path)
    assert rows[:3] == [
        CompanyName("600519.SH", "贵州茅台"),
        CompanyName("600519.SH", "Kweichow Moutai"),
        CompanyName("600519.SH", "茅台"),
    ]
    attributor = TickerAttributor.from_csv(path)
    assert len(attributor) == 5  # no package listings: the user's file replaces the default
    assert attributor.tickers(item("茅台与Tencent; Microsoft")) == ["0700.HK", "600519.SH"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("name,ticker\nApple,AAPL\n", "header must start with ticker,name"),
        ("ticker,name\nAAPL,\n", ":2: ticker and name are required"),
        ("ticker,name\n600519,Moutai\n", "'600519' is not a ticker"),
    ],
)
def test_a_bad_csv_names_the_row(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "companies.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(message)):
        read_companies_csv(path)


def test_the_default_dictionary_is_large_and_valid() -> None:
    listings = package_listings()
    assert len({row.ticker for row in listings}) > 1000  # S&P, NASDAQ 100, FTSE 100, Nikkei 225
    assert all(re.fullmatch(TICKER_PATTERN, row.ticker) for row in listings)
    assert {"9201.T", "BT-A.L", "AAPL", "BRK.B", "BF.B"} <= {row.ticker for row in listings}
    assert len(ATTRIBUTOR) > 1500
