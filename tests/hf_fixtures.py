"""Tiny random Hugging Face checkpoints written with transformers' own save_pretrained.

The T5 v1.1 fixture gets a separate, random lm_head and ``tie_word_embeddings=False``,
the layout of T0 / LM-adapted checkpoints (transformers 5 then loads it untied).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from art_jax.data.tokenizers import train_unigram, train_wordpiece

CORPUS = [
    f"{subject} {verb} the {obj} near {place} in {year}."
    for subject in ("Ada Lovelace", "the river Thames", "a small brown fox", "Marie Curie", "The committee")
    for verb in ("visited", "described", "crossed", "painted")
    for obj in ("bridge", "laboratory", "old castle", "harbour")
    for place, year in (("Paris", 1851), ("Kyoto", 1920), ("Lagos", 1977))
] + ["Who visited the bridge? When was the castle painted? Where is the harbour?"]


def make_bert_checkpoint(folder: str, *, seed: int = 0, tokenizer_vocab: int = 300, **overrides) -> str:
    from transformers import BertConfig, BertModel

    tokenizer = train_wordpiece(CORPUS, tokenizer_vocab)
    cfg = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=48, max_position_embeddings=128)
    cfg.update(overrides)
    torch.manual_seed(seed)
    BertModel(BertConfig(**cfg)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_t5_checkpoint(folder: str, *, version: str, seed: int = 0, tokenizer_vocab: int = 200, **overrides) -> str:
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = train_unigram(CORPUS, tokenizer_vocab)
    # padded past the tokenizer, as real T5 vocabularies (32128) are
    cfg = dict(vocab_size=-(-len(tokenizer) // 8) * 8, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
               num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
               decoder_start_token_id=0, feed_forward_proj="relu" if version == "1.0" else "gated-gelu")
    cfg.update(overrides)
    torch.manual_seed(seed)
    T5ForConditionalGeneration(T5Config(**cfg)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if version == "1.1":
        weights = load_file(os.path.join(folder, "model.safetensors"))
        weights["lm_head.weight"] = torch.randn_like(weights["shared.weight"]) * 0.05
        save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            config = json.load(f)
        config["tie_word_embeddings"] = False
        config.pop("scale_decoder_outputs", None)
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
    return folder


def train_byte_level_bpe(texts, vocab_size: int = 400):
    """A RoBERTa byte-level BPE tokenizer (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4) as a
    ``RobertaTokenizerFast``, trained on ``texts`` (the BPE trainer breaks ties by pair, so the
    same texts give the same merges every time)."""
    import tokenizers as tk
    from transformers import RobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    tok.train_from_iterator(list(texts), tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = tk.processors.RobertaProcessing(("</s>", 2), ("<s>", 0))  # <s> A </s></s> B </s>
    return RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


def make_roberta_checkpoint(folder: str, *, seed: int = 0, tokenizer_vocab: int = 400, **overrides) -> str:
    """A tiny random ``RobertaModel`` with real RoBERTa's config values (one token type,
    layer_norm_eps 1e-5, pad_token_id 1, positions from 2: max_position_embeddings = 2 + 64)."""
    from transformers import RobertaConfig, RobertaModel

    tokenizer = train_byte_level_bpe(CORPUS, tokenizer_vocab)
    cfg = {"vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 48, "max_position_embeddings": 66, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
           "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}
    cfg.update(overrides)
    torch.manual_seed(seed)
    RobertaModel(RobertaConfig(**cfg)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
