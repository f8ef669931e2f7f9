"""Incremental detokenization and stop strings, against the tokenizer's own whole-sequence decode and plain
`str.find`: byte-level BPE (multi-byte characters split over tokens) and a SentencePiece-style tokenizer
with byte fallback (byte tokens that merge into one character, a leading-space marker that is stripped)."""

from __future__ import annotations

import random

import pytest

from minisgl.tokenizer import max_token_chars
from minisgl.tokenizer.detokenize import IncrementalDetokenizer, StopMatcher

TEXTS = ["the café 東京 😀 the", "héllo wörld, naïve café, 東京, 😀 emoji", "a\n\nb  c", "日本語のテキスト"]


def byte_level_tokenizer():
    from checkpoints import _tokenizer_json
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), eos_token="<|endoftext|>")


def byte_fallback_tokenizer():
    """Llama-2 style: '▁' marks spaces, characters outside the vocabulary become <0xNN> byte tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in "▁abcdefghijklmnopqrstuvwxyzé,.":
        vocab.setdefault(c, len(vocab))
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("▁", "c"), ("▁c", "a"), ("▁ca", "f"), ("▁caf", "é")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TOKENIZERS = {"byte_level": byte_level_tokenizer, "byte_fallback": byte_fallback_tokenizer}


def composing_tokenizer():
    """SentencePiece-style with an NFC normalizer: three decomposed jamo compose into one syllable, one token."""
    from tokenizers import Tokenizer, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"?": 0, "각": 1, "▁": 2, "a": 3}  # every entry one character long
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="?"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(" ", "▁")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="?")


def default_model_tokenizer():
    from minisgl.models.default_model import default_model_path
    from minisgl.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path())


@pytest.mark.parametrize("make", [*TOKENIZERS.values(), composing_tokenizer, default_model_tokenizer])
def test_max_token_chars_bounds_the_tokens_of_any_text(make):
    """A prompt is refused untokenized when it has more than max_token_chars characters per context token: that
    must never refuse one that fits, even the densest text (the longest token, repeated) or composing input."""
    tok = make()
    vocab = tok.get_vocab()
    longest = max(vocab, key=lambda t: len(tok.decode([vocab[t]])))
    rng = random.Random(0)
    texts = [
        *TEXTS,
        tok.decode([vocab[longest]] * 200),
        "\u1100\u1161\u11a8" * 100,  # three decomposed jamo: one composed syllable, 각
        "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0x3000)])) for _ in range(2000)),
    ]
    bound = max_token_chars(tok)
    for text in texts:
        assert len(tok.encode(text, add_special_tokens=False)) >= len(text) // bound, text[:40]


def stream(tok, ids: list[int], chunks: list[int], skip_special_tokens: bool = True) -> list[str]:
    """Feed `ids` in pieces of the given sizes; the deltas, then the flush."""
    d = IncrementalDetokenizer(tok, skip_special_tokens)
    out, i = [], 0
    for n in chunks:
        out.append(d.add(ids[i : i + n]))
        i += n
    out.append(d.add(ids[i:]))
    return out + [d.flush()]


@pytest.mark.parametrize("kind", TOKENIZERS)
@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_whole_decode_and_never_splits_a_character(kind, text):
    tok = TOKENIZERS[kind]()
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    deltas = stream(tok, ids, [1] * len(ids))
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    if any(ord(c) > 0x3000 for c in text):  # CJK / emoji span several tokens: held back, then whole
        assert "" in deltas[: len(ids)]


def random_ids(tok, kind: str, rng: random.Random) -> list[int]:
    """Random output-like ids. Byte-level: any ids. Byte fallback: pieces, specials, and characters spelt as
    their UTF-8 byte tokens; arbitrary byte runs are left out because the tokenizer itself decodes an invalid
    run as a whole (one U+FFFD per byte), so its decode of a prefix is not a prefix of its decode."""
    n = rng.randint(1, 30)
    if kind == "byte_level":
        return [rng.randrange(len(tok)) for _ in range(n)]
    vocab = tok.get_vocab()
    pieces = [i for t, i in vocab.items() if not t.startswith("<0x")]
    ids: list[int] = []
    while len(ids) < n:
        if rng.random() < 0.3:
            ids += [vocab[f"<0x{b:02X}>"] for b in rng.choice("東京😀é日ñ€").encode()]
        else:
            ids.append(rng.choice(pieces))
    return ids


@pytest.mark.parametrize("kind", TOKENIZERS)
def test_random_ids_and_chunking_equal_whole_decode(kind):
    tok = TOKENIZERS[kind]()
    rng = random.Random(0)
    for trial in range(200):
        ids = random_ids(tok, kind, rng)
        chunks = [rng.randint(1, 4) for _ in range(rng.randint(0, 10))]
        skip = trial % 2 == 0
        assert "".join(stream(tok, ids, chunks, skip)) == tok.decode(ids, skip_special_tokens=skip), ids


def test_special_tokens_are_skipped_or_shown():
    tok = byte_level_tokenizer()
    ids = tok.encode("Paris is", add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert "".join(stream(tok, ids, [1] * len(ids), True)) == "Paris is"
    assert "".join(stream(tok, ids, [1] * len(ids), False)) == "Paris is<|im_end|>"


# ---- stop strings ---------------------------------------------------------------------------------------------
def released(stops: list[str], deltas: list[str], keep_stop: bool = False) -> tuple[str, bool]:
    m = StopMatcher(stops, keep_stop)
    out = []
    for i, d in enumerate(deltas):
        text, hit = m.feed(d, final=i == len(deltas) - 1)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out), False


def random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 6)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def first_stop(deltas: list[str], stops: list[str], keep_stop: bool = False) -> tuple[str, bool]:
    """The reference: generation ends at the first delta after which the text contains a stop; the answer is
    the text before the earliest stop in it (a longer stop that might have matched later never gets the chance),
    or through its end with keep_stop (of stops starting there, the shortest: it was complete first)."""
    text = ""
    for d in deltas:
        text += d
        hits = [(i, len(s)) for s, i in ((s, text.find(s)) for s in stops) if i >= 0]
        if hits:
            start, length = min(hits)
            return text[: start + length if keep_stop else start], True
    return text, False


def test_stop_strings_cut_before_the_first_stop_however_text_arrives():
    rng = random.Random(1)
    alphabet = "ab c\n東"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 20)))
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        deltas = random_split(text, rng)
        keep = rng.random() < 0.5
        assert released(stops, deltas, keep) == first_stop(deltas, stops, keep), (deltas, stops, keep)


def test_text_that_may_start_a_stop_is_held_back_until_it_cannot():
    m = StopMatcher(["STOP"])
    assert m.feed("hello ST") == ("hello ", False)
    assert m.feed("O") == ("", False)
    assert m.feed("X more") == ("STOX more", False)
    assert m.feed(" ST", final=True) == (" ST", False)


def test_text_fed_before_min_tokens_is_released_whole_and_never_searched():
    m = StopMatcher(["STOP"])
    assert m.feed("a STOP b ST", armed=False) == ("a STOP b ST", False)
    assert m.feed("OP", armed=True) == ("OP", False)  # the stop began in text released unarmed
    assert m.feed(" c STOP d") == (" c ", True)
