"""Small tokenizers trained on the spot, for offline demos and tests.

They have the special-token layout of the real ones (BERT: [PAD]=0, [CLS], [SEP],
[UNK], [MASK]; T5: <pad>=0, </s>=1, <unk>=2) so that every code path that serves
bert-base-uncased or T0 runs unchanged on a machine with no hub access.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors


def train_wordpiece(texts: Iterable[str], vocab_size: int = 2000):
    """An uncased BERT WordPiece tokenizer as a ``BertTokenizerFast``.

    The vocabulary is built directly, not by the WordPiece trainer (whose result varies
    from run to run): every character seen, alone and as a ``##`` continuation, then the
    most frequent whole words. Same texts, same ids, every time.
    """
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = collections.Counter()
    for text in texts:
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in words for c in word})
    vocab = specials + chars + ["##" + c for c in chars]
    frequent = sorted((kv for kv in words.items() if len(kv[0]) > 1), key=lambda kv: (-kv[1], kv[0]))
    vocab += [word for word, _ in frequent[:max(0, vocab_size - len(vocab))]]
    tok = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                             cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def train_unigram(texts: Iterable[str], vocab_size: int = 2000, sentinels: int = 0):
    """A SentencePiece-style Unigram tokenizer with T5's ids, as a ``T5TokenizerFast``.

    The vocabulary is built directly, not by the EM trainer (whose result varies from
    run to run): the most frequent whole words, then every character seen, each with its
    log frequency as the Unigram score. Same texts, same ids, every time. ``sentinels``:
    T5's mask tokens <extra_id_0> ... appended (special, as T5's 100 are).
    """
    from transformers import T5TokenizerFast

    normalizer = normalizers.NFKC()
    words = collections.Counter()
    for text in texts:
        words.update("\u2581" + w for w in normalizer.normalize_str(text).split())
    chars = collections.Counter()
    for word, count in words.items():
        chars.update({c: count for c in word})
        chars["\u2581" + word[1]] += count  # a word-initial piece for each first character
    specials = ["<pad>", "</s>", "<unk>"]
    pieces = sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))
    room = max(0, vocab_size - len(specials) - len(pieces))
    pieces += sorted((kv for kv in words.items() if len(kv[0]) > 2), key=lambda kv: (-kv[1], kv[0]))[:room]
    total = sum(words.values()) + sum(chars.values())
    vocab = [(s, 0.0) for s in specials] + [(p, math.log(c / total)) for p, c in pieces]
    tok = Tokenizer(models.Unigram(vocab, unk_id=specials.index("<unk>")))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    tokenizer = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                extra_ids=0)
    if sentinels:
        tokenizer.add_special_tokens({"additional_special_tokens": [f"<extra_id_{i}>" for i in range(sentinels)]})
    return tokenizer
