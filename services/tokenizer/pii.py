"""Masks personal data in a text before the model (or anything downstream) sees it.

Finance headlines are full of numbers: share counts, prices, years, percentages, ISINs.
Only what has a shape no ordinary figure has is masked, and checksums decide where a
shape alone would be ambiguous:
- EMAIL: `local@domain.tld`;
- CARD: 13 to 19 digits, run together or grouped as cards are printed (4-4-4-4, 4-6-5...),
  starting as a card network's numbers do (Visa 4, Mastercard 51-55 and 2221-2720, ...)
  with that network's length, and passing the Luhn check;
- ACCOUNT: an IBAN (country, check digits, up to 30 letters and digits, spaced in fours or
  not) passing its mod-97 check, or 6 to 20 digits right after "account", "acct" or "a/c";
- PHONE: `+` and a country code with 8 to 15 digits in all, North American shapes
  `(212) 555-0100` and `212-555-0100` / `212.555.0100`, or a mainland China mobile number
  (`1[3-9]` and nine digits: with `+86`/`0086`, printed 3-4-4, or eleven bare digits
  next to Chinese text or after a phone word, not as a bare figure in English text);
- NATIONAL_ID: a mainland China resident identity number (18 characters: region, birth
  date, sequence, and the ISO 7064 MOD 11-2 check character, digit or X) whose birth date
  is a real date and whose check character is right.
"Next to" is ASCII: a pattern's edges look only at ASCII letters, digits and `_`, never
at regex word characters or word boundaries, for which a Chinese or Japanese character is
a word character, so that `邮箱jane@example.com联系` and `电话13800138000` are masked too.
Each match becomes a placeholder such as `[EMAIL]`; `MaskedText` maps the masked text's
character offsets back to the original text.
"""

from __future__ import annotations

import bisect
import datetime
import enum
import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass


class PiiKind(enum.Enum):
    EMAIL = "email"
    PHONE = "phone"
    CARD = "card"
    ACCOUNT = "account"
    NATIONAL_ID = "national_id"

    @property
    def placeholder(self) -> str:
        return f"[{self.name}]"


@dataclass(frozen=True)
class Replacement:
    kind: PiiKind
    start: int
    """Span in the original text."""
    end: int
    masked_start: int
    """Span of the placeholder in the masked text."""
    masked_end: int


@dataclass(frozen=True)
class MaskedText:
    original: str
    text: str
    """What is tokenized: `original` with each replacement's span swapped for its placeholder."""
    replacements: tuple[Replacement, ...]

    def to_original(self, start: int, end: int) -> tuple[int, int]:
        """A span of `text` as a span of `original`; a span touching a placeholder covers
        all of what the placeholder stands for."""
        return self._position(start, is_end=False), self._position(end, is_end=True)

    def placeholder_at(self, offset: int) -> int | None:
        """Index in `replacements` of the placeholder holding character `offset` of `text`."""
        index = bisect.bisect_right(self._starts, offset) - 1
        if index >= 0 and offset < self.replacements[index].masked_end:
            return index
        return None

    @functools.cached_property
    def _starts(self) -> list[int]:
        return [r.masked_start for r in self.replacements]

    def _position(self, offset: int, is_end: bool) -> int:
        # The last replacement starting at or before `offset` (for an end, before it).
        starts = self._starts
        index = (bisect.bisect_left(starts, offset) if is_end else bisect.bisect_right(starts, offset)) - 1
        if index < 0:
            return offset
        replacement = self.replacements[index]
        if offset < replacement.masked_end or (is_end and offset == replacement.masked_end):
            return replacement.end if is_end else replacement.start
        return offset - replacement.masked_end + replacement.end


#: Characters of an email's local part (RFC 5322 "atext").
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
#: What glues to a pattern's edge: ASCII only. `\w` (and `\b`) count CJK characters as word
#: characters, so "邮箱a@b.com" or "电话+86 138..." would never match.
_W = "A-Za-z0-9_"
# Every pattern starts only where the previous character cannot continue it, and has one
# way to match any text: no pattern backtracks more than a few steps on hostile input.
_EMAIL = re.compile(
    rf"(?<![{_ATEXT}.])[{_ATEXT}]+(?:\.[{_ATEXT}]+)*@(?:{_LABEL}\.)+[A-Za-z](?:[A-Za-z0-9-]{{0,61}}[A-Za-z0-9])?(?![{_W}-])"
)
# Digits not glued to a word, a decimal point or a thousands separator on either side.
_CARD = re.compile(
    rf"(?<![{_W}.,])"
    r"(?:[0-9]{13,19}|[0-9]{4}([ -])[0-9]{4}\1[0-9]{4}\1[0-9]{1,4}(?:\1[0-9]{1,3})?|[0-9]{4}([ -])[0-9]{6}\2[0-9]{4,5})"
    rf"(?![{_W}]|[.,][0-9])"
)
# Compact, or printed in groups of four.
_IBAN = re.compile(
    rf"(?<![{_W}])[A-Z]{{2}}[0-9]{{2}}(?:[A-Z0-9]{{11,30}}|(?: [A-Z0-9]{{4}}){{2,7}}(?: [A-Z0-9]{{1,3}})?)(?![{_W}])"
)
_ACCOUNT_NUMBER = re.compile(
    rf"(?<![{_W}])(?:account|acct|a/c)(?:\s?(?:no\.?|number|num\.?|#))?\s?[:#]?\s?"
    rf"([0-9](?:[ -]?[0-9]){{5,19}})(?![{_W}]|[.,][0-9])",
    re.IGNORECASE,
)
_PHONE = re.compile(
    rf"(?<![{_W}+])"
    r"(?:\+[1-9][0-9]{0,2}(?:[0-9]{5,12}|(?:[ .-]?\([0-9]{1,4}\) ?[0-9]{1,5})?(?:[ .-][0-9]{1,5}){1,6})"
    r"|\([0-9]{3}\) ?[0-9]{3}[ .-][0-9]{4}"
    r"|[0-9]{3}([.-])[0-9]{3}\1[0-9]{4})"
    rf"(?![{_W}]|[.,][0-9])"
)
# Mainland China mobile: 1[3-9] and nine digits, run together or 3-4-4, after an optional
# +86 / 0086; not part of a longer figure ("1,138..." or "0.138...").
_CN_MOBILE = re.compile(
    rf"(?<![{_W}+])(?<![0-9][.,])"
    r"(?:(?:\+|00)86[ -]?)?1[3-9][0-9](?:[0-9]{8}|([ -])[0-9]{4}\1[0-9]{4})"
    rf"(?![{_W}]|[.,][0-9])"
)
# Mainland China resident identity number (GB 11643): 6-digit region, birth date
# YYYYMMDD, 3-digit sequence, check character.
_CN_RESIDENT_ID = re.compile(
    rf"(?<![{_W}])(?<![0-9][.,])"
    r"[1-9][0-9]{5}(?:18|19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])[0-9]{3}[0-9Xx]"
    rf"(?![{_W}]|[.,][0-9])"
)
_PHONE_WORD = re.compile(r"(?:tel|phone|mobile|cell|call|sms|whatsapp|wechat)\.?$", re.IGNORECASE)
#: ISO 7064 MOD 11-2 weights of the first 17 digits (2^(17-i) mod 11).
_RESIDENT_ID_WEIGHTS = tuple(pow(2, 17 - i, 11) for i in range(17))
#: A signed figure with thousands separators ("+12 345 678"), not a phone number.
_SIGNED_FIGURE = re.compile(r"\+[0-9]{1,3}(?:([ .])[0-9]{3})(?:\1[0-9]{3})*")


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def resident_id_valid(candidate: str) -> bool:
    """A mainland China resident identity number: 17 digits whose birth date (characters
    7 to 14) is a real date, then the ISO 7064 MOD 11-2 check character (X for 10)."""
    if len(candidate) != 18 or not candidate[:17].isascii() or not candidate[:17].isdigit():
        return False
    try:
        datetime.date(int(candidate[6:10]), int(candidate[10:12]), int(candidate[12:14]))
    except ValueError:
        return False
    check = (12 - sum(int(d) * w for d, w in zip(candidate[:17], _RESIDENT_ID_WEIGHTS, strict=True)) % 11) % 11
    return candidate[17].upper() == ("X" if check == 10 else str(check))


def iban_valid(candidate: str) -> bool:
    """ISO 13616: 15 to 34 characters; moved to the end and read as a number, mod 97 is 1.
    The account part must also be at least half digits, as every country's is: all-caps
    headlines ("FY24 EPS BEAT SEEN AS KEY") pass mod 97 one time in a hundred."""
    if not 15 <= len(candidate) <= 34:
        return False
    if 2 * sum(char.isdigit() for char in candidate[4:]) < len(candidate) - 4:
        return False
    rearranged = candidate[4:] + candidate[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def _digits(text: str) -> str:
    return "".join(char for char in text if char.isascii() and char.isdigit())


def card_network(digits: str) -> bool:
    """Whether `digits` start and are as long as a payment card network's numbers: years
    ("2019 2020 2021 2022") and most other figures do not, whatever their checksum."""
    length, two, three, four = len(digits), int(digits[:2]), int(digits[:3]), int(digits[:4])
    return (
        (digits[0] == "4" and length in (13, 16, 19))  # Visa
        or ((51 <= two <= 55 or 2221 <= four <= 2720) and length == 16)  # Mastercard
        or (two in (34, 37) and length == 15)  # American Express
        or ((300 <= three <= 305 or two in (36, 38, 39)) and length >= 14)  # Diners Club
        or (3528 <= four <= 3589 and length >= 16)  # JCB
        or ((two == 50 or 56 <= two <= 69) and length >= 13)  # Maestro, Discover, UnionPay
    )


def _cards(text: str) -> Iterable[tuple[int, int]]:
    for match in _CARD.finditer(text):
        digits = _digits(match.group())
        if card_network(digits) and luhn_valid(digits):
            yield match.span()


def _ibans(text: str) -> Iterable[tuple[int, int]]:
    for match in _IBAN.finditer(text):
        # Spaced groups may run on into a following word ("... 3000 SOLD"): the longest
        # prefix made of whole groups that checks out is the IBAN.
        groups = match.group().split(" ")
        for count in range(len(groups), 0, -1):
            candidate = " ".join(groups[:count])
            if iban_valid(candidate.replace(" ", "")):
                yield match.start(), match.start() + len(candidate)
                break


def _account_numbers(text: str) -> Iterable[tuple[int, int]]:
    for match in _ACCOUNT_NUMBER.finditer(text):
        yield match.span(1)


def _phones(text: str) -> Iterable[tuple[int, int]]:
    for match in _PHONE.finditer(text):
        if 8 <= len(_digits(match.group())) <= 15 and not _SIGNED_FIGURE.fullmatch(match.group()):
            yield match.span()


def _cn_mobiles(text: str) -> Iterable[tuple[int, int]]:
    for match in _CN_MOBILE.finditer(text):
        # With +86 or printed 3-4-4 it is a phone number. Eleven bare digits are one in
        # Chinese text ("电话13800138000") or after a phone word, but in English text may
        # as well be a figure ("13000000000 shares").
        if match.group(1) or not match.group()[0].isdigit() or _mobile_context(text, *match.span()):
            yield match.span()


def _mobile_context(text: str, start: int, end: int) -> bool:
    before = text[max(0, start - 12) : start].rstrip(" :\uff1a")
    after = text[end : end + 2].lstrip(" ")
    return bool(
        (before and not before[-1].isascii()) or (after and not after[0].isascii()) or _PHONE_WORD.search(before)
    )


def _resident_ids(text: str) -> Iterable[tuple[int, int]]:
    for match in _CN_RESIDENT_ID.finditer(text):
        if resident_id_valid(match.group()):
            yield match.span()


def _emails(text: str) -> Iterable[tuple[int, int]]:
    for match in _EMAIL.finditer(text):
        yield match.span()


#: In this order: an email's digits are not a phone, an IBAN's are not a card's, a
#: resident ID (its own checksum and a birth date) is not a card that happens to pass Luhn.
_FINDERS: tuple[tuple[PiiKind, Callable[[str], Iterable[tuple[int, int]]]], ...] = (
    (PiiKind.EMAIL, _emails),
    (PiiKind.ACCOUNT, _ibans),
    (PiiKind.NATIONAL_ID, _resident_ids),
    (PiiKind.CARD, _cards),
    (PiiKind.ACCOUNT, _account_numbers),
    (PiiKind.PHONE, _cn_mobiles),
    (PiiKind.PHONE, _phones),
)


class PiiMasker:
    def __init__(self, kinds: Iterable[PiiKind] = tuple(PiiKind)) -> None:
        self.kinds = frozenset(kinds)

    def mask(self, text: str) -> MaskedText:
        found: list[tuple[int, int, PiiKind]] = []
        # Which characters a finder has claimed: checking a span costs its own length, so
        # a text full of matches stays linear (comparing with every earlier match did not).
        claimed = bytearray(len(text))
        for kind, finder in _FINDERS:
            if kind not in self.kinds:
                continue
            for start, end in finder(text):
                # The first finder to claim characters keeps them.
                if not any(claimed[start:end]):
                    claimed[start:end] = b"\x01" * (end - start)
                    found.append((start, end, kind))
        if not found:
            return MaskedText(text, text, ())
        parts: list[str] = []
        replacements: list[Replacement] = []
        position = 0
        length = 0
        for start, end, kind in sorted(found, key=lambda span: span[0]):
            parts.append(text[position:start])
            length += start - position
            parts.append(kind.placeholder)
            replacements.append(Replacement(kind, start, end, length, length + len(kind.placeholder)))
            length += len(kind.placeholder)
            position = end
        parts.append(text[position:])
        return MaskedText(text, "".join(parts), tuple(replacements))
