"""Which companies a news item is about: cashtags, the producer's `tickers`, and company
names found in the text with an Aho-Corasick automaton (pyahocorasick).

The dictionary of names is a CSV, `ticker,name[,alias,...]`: one row per company, every
column after `ticker` a name or alias it is known by (rows with one name each, the old
`ticker,name` form, still read). The default dictionary is the bundled
`data/companies.csv` (large US, A-share, Hong Kong, Tokyo and London names with their
Chinese or Japanese names) plus the S&P 500/400/600, NASDAQ 100, Dow, FTSE 100 and
Nikkei 225 constituents that the `pytickersymbols` package ships (MIT licence; one-word
names that are plain words, such as `Target` or `Next`, are left out); a file of the
user's own (`INFERMESH_WORKER_COMPANIES_CSV`) replaces both.

Names in scripts written without spaces (Chinese, Japanese, Thai) match anywhere, so
`贵州茅台` is found in `贵州茅台股价大涨`; a name that begins or ends with a letter or digit
of any other script needs a boundary there, so `Meta` is not found in `metadata`. Latin
names match as the dictionary spells them or in capitals (`Target Corp`, `TARGET CORP`,
not `target corp`), so that ordinary words in the listings do not match prose.
"""

from __future__ import annotations

import csv
import functools
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import ahocorasick

from shared.messages import TICKER_PATTERN, NewsItem

DEFAULT_COMPANIES = Path(__file__).parent / "data" / "companies.csv"

_TICKER = re.compile(TICKER_PATTERN)
# $AAPL, $BRK.B, $600519.SH, $0700.HK; not $5 or $100M (a ticker starts with a letter
# unless it has an exchange suffix). The end is "no ASCII letter or digit follows", not
# `\b`, which fails between a symbol and a Chinese character ("$TSLA股价").
_CASHTAG = re.compile(
    r"(?<![\w$])\$("
    r"[0-9]{6}\.(?:SH|SS|SZ|BJ|KS|KQ)|[0-9]{4,5}\.HK|[0-9]{3}[0-9A-Z]\.T|[0-9]{4,6}\.TWO?"
    r"|[A-Za-z][A-Za-z0-9]{0,5}(?:\.[A-Za-z]{1,2})?"
    r")(?![A-Za-z0-9])"
)
# Scripts written without spaces between words: Thai, kana, CJK ideographs (and their
# extensions and compatibility forms), halfwidth katakana.
_UNSPACED = re.compile(
    r"[\u0e00-\u0e7f\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
    r"\U00020000-\U0003134f]"
)
# pytickersymbols' indices that list the exchanges this monitor knows, and the suffix
# their home listing has.
_PACKAGE_INDICES = {
    "S&P 500": "",
    "S&P 100": "",
    "S&P 600": "",
    "NASDAQ 100": "",
    "DOW JONES": "",
    "FTSE 100": ".L",
    "NIKKEI 225": ".T",
}
# Legal forms dropped from a listing's name to get the name news uses ("Adobe Inc." is
# "Adobe"); the full name is kept too.
_LEGAL_FORM = re.compile(
    r",?\s+(?:Inc\.?|Incorporated|Corp\.?|Corporation|Co\.?|Company|plc|PLC|Ltd\.?|Limited|N\.V\.|S\.A\.|AG|SE)$"
)
_PARENTHETICAL = re.compile(r"\s*\([^)]*\)")
# A US symbol, with its share class (BRK.B, or BRK-B as Yahoo writes it).
_US_SYMBOL = re.compile(r"[A-Z]{1,5}(?:[.-][A-Z])?")


def _is_spaced_word_char(char: str) -> bool:
    """A letter or digit of a script that separates words with spaces."""
    return (char.isalnum() or char == "_") and not _UNSPACED.match(char)


def _fold(text: str) -> str:
    """Lower case, one character for one, so offsets in the folded text are offsets in
    `text` (`str.lower` turns "İ" into two characters)."""
    lowered = text.lower()
    if len(lowered) == len(text):
        return lowered
    return "".join(low if len(low := char.lower()) == 1 else char for char in text)


@dataclass(frozen=True)
class CompanyName:
    ticker: str
    name: str


@dataclass(frozen=True)
class _Entry:
    ticker: str
    name: str
    boundary_start: bool
    """The name starts with a letter or digit of a spaced script: it needs a boundary."""
    boundary_end: bool
    cased: bool
    """The name has letters with case: it matches as spelled or in capitals only."""


def read_companies_csv(path: Path) -> list[CompanyName]:
    """Reads a `ticker,name[,alias,...]` CSV (a header row first; blank aliases are
    skipped). Raises ValueError naming the row for a missing name or a ticker that
    `finance.news.v1` would not accept."""
    names: list[CompanyName] = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = csv.reader(handle)
        header = [cell.strip().lower() for cell in next(rows, [])]
        if header[:2] != ["ticker", "name"]:
            raise ValueError(f"{path}:1: the header must start with ticker,name")
        for row_number, row in enumerate(rows, start=2):
            cells = [cell.strip() for cell in row]
            if not any(cells):
                continue
            ticker, aliases = cells[0].upper(), [cell for cell in cells[1:] if cell]
            if not ticker or not aliases:
                raise ValueError(f"{path}:{row_number}: ticker and name are required")
            if not _TICKER.fullmatch(ticker):
                raise ValueError(f"{path}:{row_number}: {ticker!r} is not a ticker finance.news.v1 accepts")
            names.extend(CompanyName(ticker, alias) for alias in aliases)
    return names


# A one-word name that is a plain word ("Target", "Next", "Block", "NOW"), which
# title-case and all-caps headlines use as a word.
_PLAIN_WORD = re.compile(r"[A-Z][a-z]+|[A-Z]+")


def _listing_names(name: str) -> Iterator[str]:
    """The names a listing is matched by: its name without a parenthetical, and without
    its legal form; a one-word plain word is left out (the bundled CSV names the large
    companies whose name is one, such as Honda or Visa)."""
    full = _PARENTHETICAL.sub("", name).strip()
    for form in dict.fromkeys((full, _LEGAL_FORM.sub("", full))):
        if " " in form or not _PLAIN_WORD.fullmatch(form):
            yield form


@functools.cache
def package_listings() -> tuple[CompanyName, ...]:
    """Index constituents of the `pytickersymbols` package (US, FTSE 100, Nikkei 225),
    with their home tickers (`AAPL`, `VOD.L`, `7203.T`); shipped in the wheel, nothing
    is downloaded."""
    from pytickersymbols.indices_data import INDICES  # noqa: PLC0415  # 2 MB of data: only when used

    names: list[CompanyName] = []
    for index, suffix in _PACKAGE_INDICES.items():
        for company in INDICES.get(index, {}).get("companies", []):
            symbol, name = company.get("symbol") or "", company.get("name") or ""
            if suffix:
                if not symbol.endswith(suffix):
                    continue
            elif not _US_SYMBOL.fullmatch(symbol):
                continue  # a US index member listed by its foreign home ticker
            # Yahoo writes share classes with a dash (BRK-B); cashtags and producers use a dot.
            ticker = symbol if suffix else symbol.replace("-", ".")
            if not name or not _TICKER.fullmatch(ticker):
                continue
            names.extend(CompanyName(ticker, alias) for alias in _listing_names(name))
    return tuple(names)


class TickerAttributor:
    """Finds tickers in an item; pure and cheap (one automaton per dictionary, one pass
    over the text)."""

    def __init__(self, names: Mapping[str, str] | Iterable[CompanyName]) -> None:
        """`names`: name to ticker, or CompanyName rows; where two rows give one name
        different tickers, the first wins."""
        rows = [CompanyName(ticker, name) for name, ticker in names.items()] if isinstance(names, Mapping) else names
        self._automaton = ahocorasick.Automaton()
        for row in rows:
            name = row.name.strip()
            if not name:
                continue
            key = _fold(name)
            if key in self._automaton:
                continue
            self._automaton.add_word(
                key,
                _Entry(
                    ticker=row.ticker.upper(),
                    name=name,
                    boundary_start=_is_spaced_word_char(name[0]),
                    boundary_end=_is_spaced_word_char(name[-1]),
                    cased=name.lower() != name.upper(),
                ),
            )
        self._empty = len(self._automaton) == 0
        if not self._empty:
            self._automaton.make_automaton()

    def __len__(self) -> int:
        """How many distinct names the dictionary holds."""
        return len(self._automaton)

    @classmethod
    def from_csv(cls, path: Path = DEFAULT_COMPANIES) -> TickerAttributor:
        """The dictionary in `path`; the default one adds `package_listings()` after the
        bundled rows (which win where both name a company)."""
        names: list[CompanyName] = read_companies_csv(path)
        if path == DEFAULT_COMPANIES:
            names.extend(package_listings())
        return cls(names)

    def company_names(self, text: str) -> list[tuple[int, int, str]]:
        """`(start, end, ticker)` of each company name in `text`, leftmost-longest and not
        overlapping ("Bank of America" is one name, not "America" too)."""
        if self._empty:
            return []
        candidates: list[tuple[int, int, str]] = []
        for last, entry in self._automaton.iter(_fold(text)):
            end = last + 1
            start = end - len(entry.name)
            if entry.boundary_start and start > 0 and _is_spaced_word_char(text[start - 1]):
                continue
            if entry.boundary_end and end < len(text) and _is_spaced_word_char(text[end]):
                continue
            if entry.cased and text[start:end] not in (entry.name, entry.name.upper()):
                continue
            candidates.append((start, end, entry.ticker))
        found: list[tuple[int, int, str]] = []
        position = 0
        for start, end, ticker in sorted(candidates, key=lambda match: (match[0], -match[1])):
            if start >= position:
                found.append((start, end, ticker))
                position = end
        return found

    def tickers(self, item: NewsItem) -> list[str]:
        found = set(item.tickers)
        text = item.text()
        found.update(match.upper() for match in _CASHTAG.findall(text))
        found.update(ticker for _, _, ticker in self.company_names(text))
        return sorted(found)
