"""Tiny randomly initialised transformers checkpoints with their own tokenizers, built in
a test's temporary folder: nothing comes from a model hub.

Each family gets the tokenizer kind its real checkpoints use: WordPiece (BERT,
DistilBERT, ELECTRA), byte-level BPE (RoBERTa, ModernBERT), SentencePiece-style Unigram
(XLM-R, with CJK text; DeBERTa-v2).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerFast
from typer.testing import CliRunner

from infermesh.cli import app

CORPUS = [
    "Acme shares plunge after profit warning",
    "Acme beats estimates and raises its dividend",
    "Bank of Nowhere cuts 500 jobs as margins shrink",
    "Oil prices climb on supply worries; airlines slide",
    "The central bank holds rates steady, bonds rally",
    "Quarterly revenue rose 12% to $4.1bn, ahead of forecasts",
    "Regulators fine the lender over money-laundering failures",
    "Shares of Globex were little changed in early trading",
    "東京株式市場で日経平均が反落した",
    "中国の銀行が利下げを発表",
    "央行宣布降息，股市上涨",
    "Le titre recule après un avertissement sur résultats",
]
#: Texts the tests score: short and long (padding), punctuation, digits, CJK.
TEXTS = [
    "Acme shares plunge after profit warning",
    "Revenue rose 12% to $4.1bn; the dividend is raised.",
    "Regulators fine Globex",
    "東京株式市場で日経平均が反落した",
]
LABELS = ["negative", "neutral", "positive"]


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str
    tokenizer_kind: str
    """wordpiece, bytelevel or unigram."""
    config: dict[str, Any]


SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}

FAMILIES = [
    Family("bert", "bert", "wordpiece", {**SMALL, "max_position_embeddings": 64}),
    Family(
        "distilbert",
        "distilbert",
        "wordpiece",
        {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64, "max_position_embeddings": 64},
    ),
    Family("roberta", "roberta", "bytelevel", {**SMALL, "max_position_embeddings": 66, "type_vocab_size": 1}),
    Family("xlm-roberta", "xlm-roberta", "unigram", {**SMALL, "max_position_embeddings": 66, "type_vocab_size": 1}),
    Family("deberta-v2", "deberta-v2", "unigram", {**SMALL, "max_position_embeddings": 64, "type_vocab_size": 0}),
    Family("electra", "electra", "wordpiece", {**SMALL, "embedding_size": 16, "max_position_embeddings": 64}),
    Family(
        "modernbert",
        "modernbert",
        "bytelevel",
        {
            **SMALL,
            "max_position_embeddings": 64,
            "global_attn_every_n_layers": 1,
            "local_attention": 16,
        },
    ),
]

#: Special tokens per tokenizer kind: (cls, sep, pad, unk, mask).
_SPECIALS = {
    "wordpiece": ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"),
    "bytelevel": ("<s>", "</s>", "<pad>", "<unk>", "<mask>"),
    "unigram": ("<s>", "</s>", "<pad>", "<unk>", "<mask>"),
}


def build_tokenizer(kind: str, folder: Path, specials: tuple[str, ...] | None = None) -> Any:
    """Trains a small tokenizer of `kind` on CORPUS, wraps it in PreTrainedTokenizerFast and
    saves it to `folder` (tokenizer.json, tokenizer_config.json); returns the wrapper."""
    cls, sep, pad, unk, mask = specials or _SPECIALS[kind]
    # The order fixes the ids: pad first for WordPiece (BERT's pad id 0), <s> first and
    # <pad> second for RoBERTa-style models (pad id 1).
    order = [pad, unk, cls, sep, mask] if kind == "wordpiece" else [cls, pad, sep, unk, mask]
    tokenizer: Tokenizer
    if kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token=unk))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer: Any = trainers.WordPieceTrainer(vocab_size=300, special_tokens=order)
    elif kind == "bytelevel":
        tokenizer = Tokenizer(models.BPE(unk_token=None))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=order, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.NFKC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=order, unk_token=unk)
    tokenizer.train_from_iterator(CORPUS * 3, trainer)
    ids = {token: int(tokenizer.token_to_id(token) or 0) for token in (cls, sep)}
    if kind == "bytelevel" and cls == "<s>":
        # RoBERTa's own post-processor; trim_offsets=False keeps the leading-space offsets
        # of "Ġword" tokens, the case the tokenizer service must trim itself.
        tokenizer.post_processor = processors.RobertaProcessing(
            (sep, ids[sep]), (cls, ids[cls]), trim_offsets=False, add_prefix_space=False
        )
    else:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, ids[cls]), (sep, ids[sep])],
        )
    wrapped = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        cls_token=cls,
        sep_token=sep,
        pad_token=pad,
        unk_token=unk,
        mask_token=mask,
        bos_token=cls,
        eos_token=sep,
        model_max_length=512,
    )
    wrapped.save_pretrained(folder)
    return wrapped


def build_character_tokenizer(folder: Path, texts: list[str]) -> Any:
    """A SentencePiece-style Unigram tokenizer (XLM-R's specials and ids) whose vocabulary
    is the characters of `texts` after NFKC, one piece each: what a small Chinese model's
    vocabulary is like, and any other character is `<unk>`. Saved to `folder`; returns the
    PreTrainedTokenizerFast wrapper."""
    cls, pad, sep, unk, mask = "<s>", "<pad>", "</s>", "<unk>", "<mask>"
    normalizer = normalizers.NFKC()
    counts: dict[str, int] = {}
    for text in texts:
        for char in normalizer.normalize_str(text).replace(" ", "▁"):
            counts[char] = counts.get(char, 0) + 1
    counts["▁"] = counts.get("▁", 0) + len(texts)  # Metaspace starts each text with one
    total = sum(counts.values())
    pieces = [(token, 0.0) for token in (cls, pad, sep, unk, mask)]
    pieces += [(char, math.log(count / total)) for char, count in sorted(counts.items())]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=3))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=[(cls, 0), (sep, 2)]
    )
    wrapped = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        cls_token=cls,
        sep_token=sep,
        pad_token=pad,
        unk_token=unk,
        mask_token=mask,
        bos_token=cls,
        eos_token=sep,
        model_max_length=512,
    )
    wrapped.save_pretrained(folder)
    return wrapped


def build_checkpoint(
    family: Family,
    folder: Path,
    labels: list[str] | None = None,
    problem_type: str | None = None,
    seed: int = 0,
    tokenizer: Any = None,
) -> Path:
    """A tiny `<family>ForSequenceClassification` with random weights and its tokenizer in
    `folder`; returns `folder`. `tokenizer`: one already saved in `folder` (such as
    `build_character_tokenizer`'s); by default one of the family's kind trained on CORPUS."""
    labels = labels or LABELS
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        specials = ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]") if family.model_type == "modernbert" else None
        tokenizer = build_tokenizer(family.tokenizer_kind, folder, specials)
    extra: dict[str, Any] = {}
    if problem_type:
        extra["problem_type"] = problem_type
    config = AutoConfig.for_model(
        family.model_type,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        **family.config,
        **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)  # type: ignore[no-untyped-call]
    # Random heads give near-uniform outputs; larger weights make labels differ per text.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(4.0)
    model.save_pretrained(folder)
    return folder


#: The two-head tiny version's heads: the primary (softmax) and a multi-label one.
TWO_HEAD_PRIMARY = ("sentiment", ["negative", "neutral", "positive"])
TWO_HEAD_EXTRA = ("topic", ["earnings", "merger", "lawsuit", "macro"])


def two_head_version(repository: Path, name: str, scratch: Path, family_name: str = "bert") -> Path:
    """`repository/name/1`: a tiny BERT whose one output layer carries two heads side by
    side, imported and then described as two heads (`sentiment`, softmax, with a score
    mapping; `topic`, sigmoid, with its own temperature): what `make model` builds for the
    default model, at test size. Returns the version folder."""
    family = next(f for f in FAMILIES if f.name == family_name)
    columns = TWO_HEAD_PRIMARY[1] + TWO_HEAD_EXTRA[1]
    checkpoint = build_checkpoint(family, scratch / f"{name}-checkpoint", labels=columns)
    result = CliRunner().invoke(app, ["import", str(checkpoint), "--model", name, "--repository", str(repository)])
    assert result.exit_code == 0, result.output
    folder = repository / name / "1"
    config = json.loads((folder / "config.json").read_text())
    config |= {
        "head": TWO_HEAD_PRIMARY[0],
        "labels": TWO_HEAD_PRIMARY[1],
        "activation": "softmax",
        "thresholds": {},
        "scores": {"negative": -1.0, "positive": 1.0},
        "extra_heads": [
            {"name": TWO_HEAD_EXTRA[0], "labels": TWO_HEAD_EXTRA[1], "activation": "sigmoid", "temperature": 1.5}
        ],
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
