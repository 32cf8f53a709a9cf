"""Which companies a news item is about: cashtags, the producer's `tickers`, and company
names from a CSV dictionary (`ticker,name`, one row per name or alias)."""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from pathlib import Path

from shared.messages import NewsItem

DEFAULT_COMPANIES = Path(__file__).parent / "data" / "companies.csv"

# $AAPL, $BRK.B; not $5 or $100M (a ticker starts with a letter and stands alone).
_CASHTAG = re.compile(r"(?<![\w$])\$([A-Za-z][A-Za-z0-9]{0,5}(?:\.[A-Za-z])?)\b")


class TickerAttributor:
    """Finds tickers in an item; pure and cheap (one compiled regex per dictionary)."""

    def __init__(self, names: Mapping[str, str]) -> None:
        self._by_name = {name.casefold(): ticker.upper() for name, ticker in names.items()}
        # Longest names first, so "Bank of America" wins over "America".
        alternatives = sorted(self._by_name, key=len, reverse=True)
        self._names = (
            re.compile(r"\b(" + "|".join(re.escape(name) for name in alternatives) + r")\b", re.IGNORECASE)
            if alternatives
            else None
        )

    @classmethod
    def from_csv(cls, path: Path = DEFAULT_COMPANIES) -> TickerAttributor:
        names: dict[str, str] = {}
        with path.open(newline="", encoding="utf-8") as handle:
            for row_number, row in enumerate(csv.DictReader(handle), start=2):
                ticker, name = (row.get("ticker") or "").strip(), (row.get("name") or "").strip()
                if not ticker or not name:
                    raise ValueError(f"{path}:{row_number}: ticker and name are required")
                names[name] = ticker
        return cls(names)

    def tickers(self, item: NewsItem) -> list[str]:
        found = set(item.tickers)
        text = item.text()
        found.update(match.upper() for match in _CASHTAG.findall(text))
        if self._names is not None:
            found.update(self._by_name[match.casefold()] for match in self._names.findall(text))
        return sorted(found)
