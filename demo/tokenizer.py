"""A word-level Hugging Face tokenizer for the demo vocabulary, with the chat template.

Words are split on whitespace and punctuation; the WordPiece decoder (with no `##` pieces in the
vocabulary) joins them with single spaces, so vLLM's detokenised text reads normally and a
letter's logprob token string is exactly `A`, `B`, ... with no space marker.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from calibserve.demo.chat import CHAT_TEMPLATE, END, PAD, SPECIAL_TOKENS, UNK


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Vocabulary = special tokens, then every word of `texts` in first-seen order."""
    pre = pre_tokenizers.Whitespace()
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text):
            if word not in vocab:
                vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=END,
        pad_token=PAD,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
