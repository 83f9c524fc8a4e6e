"""A character-level tokenizer saved as a transformers tokenizer.

One token per printable ASCII character and newline, plus <pad>, <s>, </s> and <unk>;
built with the `tokenizers` library and wrapped in PreTrainedTokenizerFast so that
`AutoTokenizer.from_pretrained(folder)` reloads it like any other tokenizer.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))


def char_vocab() -> dict[str, int]:
    """Token -> id: the four special tokens first, then newline and printable ASCII."""
    return {tok: i for i, tok in enumerate((*SPECIALS, *CHARS))}


def build_char_tokenizer():
    """A PreTrainedTokenizerFast that maps each character to one id (no BOS/EOS added).

    Sequences are assembled by `data.collate`, which appends EOS itself.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(char_vocab(), unk_token="<unk>"))
    # Every character is its own pre-token, spaces and newlines included.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
        truncation_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def save_char_tokenizer(out: str | Path) -> Path:
    """Build the character tokenizer and save it with `save_pretrained` into `out`."""
    build_char_tokenizer().save_pretrained(str(out))
    return Path(out)
