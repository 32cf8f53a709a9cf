"""PII masking in the tokenizer (and the explainer, which tokenizes for itself): what is masked,
what is left alone, and where offsets point."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from hypothesis import given
from hypothesis import strategies as st

from services.explainer.server import start as start_explainer
from services.explainer.settings import ExplainerSettings
from services.tokenizer.core import Tokenizer, TokenizerLimits
from services.tokenizer.pii import MaskedText, PiiKind, PiiMasker, iban_valid, luhn_valid, resident_id_valid
from services.tokenizer.server import start as start_tokenizer
from services.tokenizer.settings import TokenizerSettings
from shared.grpc_server import RunningServer
from shared.pb import explainer_pb2 as explainer_pb
from shared.pb import explainer_pb2_grpc as explainer_grpc
from shared.pb import tokenizer_pb2 as pb
from shared.pb import tokenizer_pb2_grpc as pb_grpc
from tests.conftest import MODEL
from tests.properties import hypothesis_settings
from tests.reliability import Observed

MASKER = PiiMasker()
FINANCE_HEADLINE = "Apple sold 1,234,567 shares at $189.50 in 2024"


def masked_spans(masked: MaskedText) -> list[tuple[str, str]]:
    return [(r.kind.value, masked.original[r.start : r.end]) for r in masked.replacements]


@pytest.mark.parametrize(
    ("text", "expected", "spans"),
    [
        (
            "Write to jane.doe+ir@example.co.uk today.",
            "Write to [EMAIL] today.",
            [("email", "jane.doe+ir@example.co.uk")],
        ),
        (
            "Card 4111 1111 1111 1111 and 4532015112830366 were used",
            "Card [CARD] and [CARD] were used",
            [("card", "4111 1111 1111 1111"), ("card", "4532015112830366")],
        ),
        ("Amex 3782-822463-10005 declined", "Amex [CARD] declined", [("card", "3782-822463-10005")]),
        (
            "Wire to DE89 3704 0044 0532 0130 00 SOLD",
            "Wire to [ACCOUNT] SOLD",
            [("account", "DE89 3704 0044 0532 0130 00")],
        ),
        ("IBAN GB29NWBK60161331926819.", "IBAN [ACCOUNT].", [("account", "GB29NWBK60161331926819")]),
        ("account no. 12345678 was frozen", "account no. [ACCOUNT] was frozen", [("account", "12345678")]),
        (
            "Call +44 20 7946 0958, (212) 555-0100 or 212.555.0100",
            "Call [PHONE], [PHONE] or [PHONE]",
            [("phone", "+44 20 7946 0958"), ("phone", "(212) 555-0100"), ("phone", "212.555.0100")],
        ),
        ("+1 (212) 555-0100", "[PHONE]", [("phone", "+1 (212) 555-0100")]),
    ],
)
def test_personal_data_becomes_placeholders(text: str, expected: str, spans: list[tuple[str, str]]) -> None:
    masked = MASKER.mask(text)
    assert masked.text == expected
    assert masked_spans(masked) == spans


@pytest.mark.parametrize(
    "text",
    [
        FINANCE_HEADLINE,
        "Nasdaq +1.5% to 14,200.35; S&P 500 -0.8% (4,512.2) on 2024-01-15 at 10:30",
        "Net profit +12 345 678 EUR, guidance 100-200 bps, Q3 2024, FY24 EPS BEAT SEEN AS KEY DRIVER",
        "ISIN US0378331005, CUSIP 037833100, market cap 2,950,000,000,000",
        "Card number 4111 1111 1111 1112 fails the Luhn check",
        "Order 7000000000000000 comes from no card issuer",
        "Years 2019 2020 2021 2022 and 2030 208004 4999 are not cards",
        "accounts for 12% of revenue; account 2024 review",
    ],
)
def test_ordinary_finance_numbers_are_left_alone(text: str) -> None:
    assert MASKER.mask(text).text == text


def test_only_the_configured_kinds_are_masked() -> None:
    masked = PiiMasker([PiiKind.EMAIL]).mask("ir@acme.com or +44 20 7946 0958")
    assert masked.text == "[EMAIL] or +44 20 7946 0958"


def test_offsets_map_back_to_the_original_text() -> None:
    masked = MASKER.mask("Mail ir@acme.com now")
    assert masked.text == "Mail [EMAIL] now"
    assert masked.to_original(0, 4) == (0, 4)  # "Mail"
    assert masked.to_original(5, 6) == (5, 16)  # "[" stands for the whole address
    assert masked.to_original(6, 11) == (5, 16)
    assert masked.to_original(13, 16) == (17, 20)  # "now"


# Generated data: what a masker must catch wherever it sits in arbitrary text.
surroundings = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)


#: (first digits, length) of card networks' numbers: Visa, Mastercard (both series),
#: American Express, Diners Club, Discover, UnionPay, JCB.
NETWORKS = [
    ("4", 16),
    ("4", 13),
    ("52", 16),
    ("2720", 16),
    ("37", 15),
    ("36", 14),
    ("6011", 16),
    ("62", 19),
    ("3530", 16),
]


@st.composite
def cards(draw: st.DrawFn) -> str:
    prefix, length = draw(st.sampled_from(NETWORKS))
    digits = draw(st.lists(st.sampled_from("0123456789"), min_size=length - len(prefix) - 1))
    body = prefix + "".join(digits)[: length - len(prefix) - 1]
    number = body + next(d for d in "0123456789" if luhn_valid(body + d))
    separator = draw(st.sampled_from(["", " ", "-"]))
    if separator and length in (16, 19):
        return separator.join(number[i : i + 4] for i in range(0, length, 4))
    if separator and length in (14, 15):
        return separator.join((number[:4], number[4:10], number[10:]))
    return number


@st.composite
def ibans(draw: st.DrawFn) -> str:
    country = draw(st.sampled_from(["DE", "FR", "GB", "NL", "ES", "IT", "CH", "BE"]))
    account = "".join(draw(st.lists(st.sampled_from("0123456789"), min_size=12, max_size=26)))
    check = next(f"{c:02d}" for c in range(100) if iban_valid(f"{country}{c:02d}{account}"))
    compact = f"{country}{check}{account}"
    if draw(st.booleans()):
        return " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))
    return compact


@pytest.mark.parametrize(
    ("strategy", "kind"),
    [(st.emails(), PiiKind.EMAIL), (cards(), PiiKind.CARD), (ibans(), PiiKind.ACCOUNT)],
    ids=["email", "card", "iban"],
)
def test_generated_personal_data_in_random_text_is_always_masked(
    strategy: st.SearchStrategy[str], kind: PiiKind
) -> None:
    @hypothesis_settings(150)
    @given(before=surroundings, secret=strategy, after=surroundings)
    def check(before: str, secret: str, after: str) -> None:
        text = f"{before} {secret} {after}"
        masked = MASKER.mask(text)
        start = len(before) + 1
        assert any(r.kind is kind and r.start <= start and start + len(secret) <= r.end for r in masked.replacements), (
            masked.text
        )
        assert secret not in masked.text

    check()


def test_luhn_invalid_digit_runs_are_not_cards() -> None:
    @hypothesis_settings(200)
    @given(digits=st.text("0123456789", min_size=13, max_size=19).filter(lambda d: not luhn_valid(d)))
    def check(digits: str) -> None:
        text = f"Volume {digits} traded"
        assert MASKER.mask(text).text == text

    check()


@st.composite
def finance_headlines(draw: st.DrawFn) -> str:
    figures = st.one_of(
        st.integers(0, 10**12).map(lambda n: f"{n:,}"),  # share counts
        st.integers(0, 10**12).map(str),
        st.floats(0, 1e6, allow_nan=False).map(lambda x: f"${x:,.2f}"),  # prices
        st.floats(-100, 100, allow_nan=False).map(lambda x: f"{x:+.1f}%"),  # changes
        st.integers(1900, 2100).map(str),  # years
        st.dates().map(lambda d: d.isoformat()),
        st.integers(1, 4).map(lambda q: f"Q{q}"),
    )
    words = st.sampled_from(["Apple", "sold", "shares", "at", "in", "rose", "to", "from", "EPS", "revenue", "vs"])
    # Words between the figures, as in a sentence: bare figures in a row can take a card's shape.
    pairs = draw(st.lists(st.tuples(figures, words), min_size=1, max_size=6))
    return " ".join(f"{figure} {word}" for figure, word in pairs)


def test_generated_finance_headlines_are_never_masked() -> None:
    @hypothesis_settings(300)
    @given(text=finance_headlines())
    def check(text: str) -> None:
        assert MASKER.mask(text).text == text

    check()


def test_masking_is_linear_on_hostile_text() -> None:
    # Each pattern starts only where its previous character cannot continue it, so no
    # input makes it backtrack: 256 KiB of near-misses mask in well under a second.
    started = time.perf_counter()
    for hostile in ("!" * 262_144, "AB12" + " ABCD" * 50_000, "account" + " " * 262_144, "+1234567890123456 " * 14_000):
        MASKER.mask(hostile)
    assert time.perf_counter() - started < 5


def test_masking_is_linear_in_the_number_of_matches() -> None:
    # 256 KiB made of matches: each one is checked against the characters already claimed,
    # not against every earlier match (that took 17 s for the emails).
    started = time.perf_counter()
    for crowded in ("a@b.cd " * 37_000, "4111 1111 1111 1111 " * 13_000, "account 123456 " * 17_000):
        assert MASKER.mask(crowded).replacements
    assert time.perf_counter() - started < 5


# --- Through the tokenizer --------------------------------------------------------------


@pytest.fixture(scope="module")
def masking_tokenizer(built_model: Path) -> Tokenizer:
    return Tokenizer(built_model / "tokenizer.json", MODEL, TokenizerLimits(128, 32, 8, 20_000), PiiMasker())


def test_token_offsets_index_the_callers_text(masking_tokenizer: Tokenizer) -> None:
    text = "Contact jane.doe@example.com about card 4111 1111 1111 1111"
    (result,) = masking_tokenizer.tokenize([text], return_offsets=True)
    assert result.masked == 2
    (chunk,) = result.chunks
    assert chunk.offsets is not None and chunk.word_ids is not None
    words: dict[int, str] = {}
    for (start, end), word in zip(chunk.offsets, chunk.word_ids, strict=True):
        if word >= 0:
            words[word] = text[start:end]
    # "[", "email", "]" are one word spanning the address the caller sent.
    assert list(words.values()) == ["Contact", "jane.doe@example.com", "about", "card", "4111 1111 1111 1111"]
    assert (chunk.char_start, chunk.char_end) == (0, len(text))


def test_offsets_stay_inside_the_text_for_generated_text(masking_tokenizer: Tokenizer, built_model: Path) -> None:
    plain = Tokenizer(built_model / "tokenizer.json", MODEL, masking_tokenizer.limits)

    @hypothesis_settings(150)
    @given(before=surroundings, secret=st.emails() | cards(), after=surroundings, max_length=st.sampled_from([8, 128]))
    def check(before: str, secret: str, after: str, max_length: int) -> None:
        text = f"{before} {secret} {after}"
        masked = MASKER.mask(text)
        # A masked secret leaves a placeholder: there is always something to tokenize.
        (result,) = masking_tokenizer.tokenize([text], max_length=max_length, return_offsets=True)
        (reference,) = plain.tokenize([masked.text], max_length=max_length, return_offsets=True)
        for chunk, seen in zip(result.chunks, reference.chunks, strict=True):
            assert chunk.input_ids == seen.input_ids  # the model sees the masked text
            assert chunk.offsets is not None and seen.offsets is not None
            for (start, end), (masked_start, masked_end) in zip(chunk.offsets[1:-1], seen.offsets[1:-1], strict=True):
                assert 0 <= start <= end <= len(text)
                inside = masked.placeholder_at(masked_start)
                if inside is None:
                    assert text[start:end] == masked.text[masked_start:masked_end]
                else:
                    replacement = masked.replacements[inside]
                    assert (start, end) == (replacement.start, replacement.end)

    check()


@pytest_asyncio.fixture(scope="module")
async def masking_server(model_repository: Path) -> AsyncIterator[RunningServer]:
    running = await start_tokenizer(TokenizerSettings(grpc_port=0, model_repository=model_repository, mask_pii=True))
    yield running
    await running.stop(0)


@pytest.mark.reliability(
    "Privacy",
    "Tokenizer with INFERMESH_TOKENIZER_MASK_PII=true gets a headline with an email, a phone number, a card "
    "and an IBAN",
    "none of their token pieces reach the model; placeholders do; offsets still index the caller's text",
)
async def test_masking_server_sends_no_piece_of_the_personal_data(
    masking_server: RunningServer, tokenizer_stub: pb_grpc.TokenizerServiceAsyncStub, observed: Observed
) -> None:
    secrets = ["zebulon.quaxley@examplebank.org", "+44 20 7946 0958", "4532 0151 1283 0366", "GB29NWBK60161331926819"]
    text = f"Acme whistleblower {secrets[0]} ({secrets[1]}) leaked card {secrets[2]} and {secrets[3]}"
    # What the secrets tokenize to without masking (the session's tokenizer does not mask).
    pieces = await tokenizer_stub.Tokenize(pb.TokenizeRequest(texts=secrets))
    secret_ids = {i for result in pieces.results for i in result.chunks[0].input_ids[1:-1]}
    plain = await tokenizer_stub.Tokenize(pb.TokenizeRequest(texts=[text]))
    assert secret_ids <= set(plain.results[0].chunks[0].input_ids)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{masking_server.port}") as opened:
        reply = await pb_grpc.TokenizerServiceStub(opened).Tokenize(
            pb.TokenizeRequest(texts=[text], return_offsets=True)
        )
    (chunk,) = reply.results[0].chunks
    leaked = secret_ids & set(chunk.input_ids)
    placeholders = {"[EMAIL]", "[PHONE]", "[CARD]", "[ACCOUNT]"}
    spans = {text[s:e] for s, e in zip(chunk.offset_starts, chunk.offset_ends, strict=True) if e > s}
    observed.record(
        f"{len(secrets)} secrets, {len(secret_ids)} distinct token pieces; {len(leaked)} reached the model; "
        f"offsets of the placeholders' tokens span the original {len(spans & set(secrets))} secrets"
    )
    assert not leaked
    assert spans >= set(secrets)
    assert not placeholders & spans


async def test_a_masking_explainer_explains_the_masked_text(
    inference_server: RunningServer, model_repository: Path
) -> None:
    email = "zebulon.quaxley@examplebank.org"
    text = f"Acme whistleblower {email} says profits were inflated"
    settings = ExplainerSettings(
        grpc_port=0, model_repository=model_repository, inference=f"127.0.0.1:{inference_server.port}", mask_pii=True
    )
    running, versions = await start_explainer(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as opened:
            reply = await explainer_grpc.ExplainerServiceStub(opened).Explain(
                explainer_pb.ExplainRequest(texts=[text], method=explainer_pb.METHOD_OCCLUSION)
            )
    finally:
        await running.stop(0)
        await versions.close()
    (chunk,) = reply.explanations[0].chunks
    start = text.index(email)
    span = (start, start + len(email))
    touching = [(t.start, t.end) for t in chunk.tokens if t.start < span[1] and span[0] < t.end]
    assert touching and set(touching) == {span}  # placeholder tokens, each covering the whole email
    assert [w.text for w in chunk.words if (w.start, w.end) == span] == [email]


# Mainland China: resident ID numbers, mobile numbers, bank cards, and PII next to CJK text.
RESIDENT_ID = "11010519491231002X"  # the GB 11643 example: check character X


@pytest.mark.parametrize(
    ("text", "expected", "spans"),
    [
        ("身份证号11010519491231002X，请核实", "身份证号[NATIONAL_ID]，请核实", [("national_id", RESIDENT_ID)]),
        ("ID 11010519491231002x on file", "ID [NATIONAL_ID] on file", [("national_id", "11010519491231002x")]),
        ("电话13800138000咨询", "电话[PHONE]咨询", [("phone", "13800138000")]),
        ("手机：+86 138 0013 8000。", "手机：[PHONE]。", [("phone", "+86 138 0013 8000")]),
        (
            "Call 0086-13912345678 or tel: 13800138000",
            "Call [PHONE] or tel: [PHONE]",
            [("phone", "0086-13912345678"), ("phone", "13800138000")],
        ),
        ("138-0013-8000 is his", "[PHONE] is his", [("phone", "138-0013-8000")]),
        ("联系邮箱jane.doe@example.com联系人", "联系邮箱[EMAIL]联系人", [("email", "jane.doe@example.com")]),
        ("卡号6222 0000 0000 0000 004转账", "卡号[CARD]转账", [("card", "6222 0000 0000 0000 004")]),
        ("卡号4111111111111111已冻结", "卡号[CARD]已冻结", [("card", "4111111111111111")]),
        ("致电+44 20 7946 0958或", "致电[PHONE]或", [("phone", "+44 20 7946 0958")]),
        ("账户DE89370400440532013000转入", "账户[ACCOUNT]转入", [("account", "DE89370400440532013000")]),
    ],
)
def test_chinese_personal_data_and_pii_next_to_cjk(text: str, expected: str, spans: list[tuple[str, str]]) -> None:
    masked = MASKER.mask(text)
    assert masked.text == expected
    assert masked_spans(masked) == spans


@pytest.mark.parametrize(
    "text",
    [
        "11010519491231002X9 is longer than an ID",
        "订单号110105194912310021的校验位不对",  # check character wrong
        "序列号110105194913310029",  # month 13
        "sold 13800138000 shares",  # eleven bare digits in English text: a figure
        "营收12800000000元",  # not a mobile prefix (12)
        "Revenue 1,380,013,800 vs 13,800,138,000",
    ],
)
def test_chinese_shapes_that_are_not_personal_data_are_left_alone(text: str) -> None:
    assert MASKER.mask(text).text == text


def test_resident_id_check_character() -> None:
    assert resident_id_valid(RESIDENT_ID)
    assert resident_id_valid(RESIDENT_ID.lower())
    assert not resident_id_valid("110105194912310021")
    assert not resident_id_valid("110105190002290010")  # 1900 was no leap year


def resident_id_check(body: str) -> str:
    weights = [pow(2, 17 - i, 11) for i in range(17)]
    check = (12 - sum(int(d) * w for d, w in zip(body, weights, strict=True)) % 11) % 11
    return "X" if check == 10 else str(check)


@st.composite
def resident_ids(draw: st.DrawFn) -> str:
    region = draw(st.integers(110000, 659999).map(str))
    birth = draw(st.dates(min_value=date(1900, 1, 1), max_value=date(2025, 12, 31))).strftime("%Y%m%d")
    sequence = draw(st.integers(0, 999).map(lambda n: f"{n:03d}"))
    body = region + birth + sequence
    return body + resident_id_check(body)


@st.composite
def cn_mobiles(draw: st.DrawFn) -> str:
    digits = (
        "1"
        + draw(st.sampled_from("3456789"))
        + "".join(draw(st.lists(st.sampled_from("0123456789"), min_size=9, max_size=9)))
    )
    shape = draw(st.sampled_from(["+86", "+86 ", "0086", "grouped", "bare"]))
    if shape == "grouped":
        return f"{digits[:3]} {digits[3:7]} {digits[7:]}"
    return digits if shape == "bare" else shape + digits


#: CJK text on both sides, no space: where `\b` found nothing.
cjk_surroundings = st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1, max_size=10)


@pytest.mark.parametrize(
    ("strategy", "kind"),
    [
        (resident_ids(), PiiKind.NATIONAL_ID),
        (cn_mobiles(), PiiKind.PHONE),
        (cards(), PiiKind.CARD),
        (st.emails().filter(lambda e: e.isascii()), PiiKind.EMAIL),
    ],
    ids=["resident-id", "mobile", "card", "email"],
)
def test_generated_personal_data_glued_to_chinese_text_is_always_masked(
    strategy: st.SearchStrategy[str], kind: PiiKind
) -> None:
    @hypothesis_settings(150)
    @given(before=cjk_surroundings, secret=strategy, after=cjk_surroundings)
    def check(before: str, secret: str, after: str) -> None:
        masked = MASKER.mask(before + secret + after)
        start = len(before)
        assert any(r.kind is kind and r.start <= start and start + len(secret) <= r.end for r in masked.replacements), (
            masked.text
        )
        assert secret not in masked.text

    check()


def test_random_eighteen_digit_numbers_are_masked_only_when_they_check_out() -> None:
    @hypothesis_settings(300)
    @given(digits=st.text("0123456789", min_size=18, max_size=18))
    def check(digits: str) -> None:
        masked = MASKER.mask(f"编号{digits}。")
        is_id = any(r.kind is PiiKind.NATIONAL_ID for r in masked.replacements)
        assert is_id == resident_id_valid(digits)

    check()
