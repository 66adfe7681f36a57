"""Offline tokenizers for the `tiny` and `toy` models.

Real FLUX ships its CLIP and T5 tokenizers; offline we build small ones from a fixed word list so the files are
deterministic (BPE *training* is not) and committed under `multicrafter/assets/`. Every printable ASCII character is
in the vocabulary, so any prompt tokenises; whole words from WORDS become single tokens, which makes the toy model's
text side easy to learn. Rebuild with `python -m multicrafter.vocab` (only needed when WORDS changes).
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
CLIP_DIR = ASSETS / "tokenizer_clip"
T5_DIR = ASSETS / "tokenizer_t5"

WORDS = """
a an the and with of on in at to from by is are one two three four five six left right top bottom upper lower middle
centre center near far behind front next beside between above below small large big tiny huge medium
background scene image photo picture plain striped stripes dotted dots checkered checker checkerboard ringed rings
ring split solid gradient noise noisy textured wavy grid spotted spots zigzag cross crosses marks mark
circle square triangle diamond star hexagon pentagon heart cross plus ring oval ellipse rectangle moon arrow
red green blue yellow orange purple pink white black grey gray brown cyan magenta teal navy lime olive maroon
gold silver beige violet indigo turquoise coral salmon crimson lavender mint sky dark light pale bright
person man woman boy girl child dog cat bear teddy toy car bike motorcycle robot vase cup mug bottle hat shirt
sitting standing riding holding wearing playing walking looking smiling together portrait
subject subjects object objects identity reference references
""".split()


def _unique(words: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w.lower(), None)
    return list(seen)


def _apply_bpe(symbols: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Plain BPE: repeatedly merge the adjacent pair with the lowest merge rank."""
    ranks = {m: i for i, m in enumerate(merges)}
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        pairs = [p for p in pairs if p[0] is not None]
        if not pairs:
            break
        _, i = min(pairs)
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def clip_vocab_and_merges(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Character tokens (+ end-of-word forms) plus left-to-right prefix merges that build each whole word."""
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _unique(words or WORDS):
        # Segment the word with the merges so far, then chain its pieces; later merges never change earlier words.
        pieces = _apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], merges)
        left = pieces[0]
        for right in pieces[1:]:
            merges.append((left, right))
            left = left + right
            vocab.setdefault(left, len(vocab))
    return vocab, merges


def t5_vocab(words: list[str] | None = None) -> list[tuple[str, float]]:
    """Unigram vocabulary: specials, whole words (high score), then single characters (low score)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in _unique(words or WORDS)]
    vocab += [(chr(c), -5.0) for c in range(33, 127)]
    vocab += [("▁" + chr(c), -4.0) for c in range(33, 127) if ("▁" + chr(c), -1.0) not in vocab]
    seen: set[str] = set()
    out = []
    for tok, score in vocab:
        if tok not in seen:
            seen.add(tok)
            out.append((tok, score))
    return out


def build_tokenizers(out_clip: Path = CLIP_DIR, out_t5: Path = T5_DIR, words: list[str] | None = None) -> None:
    """Write the offline CLIP and T5 tokenizers built from the ToyWorld vocabulary (run once; the files are committed)."""
    # transformers is loaded only when tokenizers are made: presets imports this module at start-up
    from transformers import CLIPTokenizer, T5Tokenizer

    vocab, merges = clip_vocab_and_merges(words)
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77).save_pretrained(out_clip)
    T5Tokenizer(vocab=t5_vocab(words), extra_ids=0, model_max_length=512).save_pretrained(out_t5)


def load_tokenizers():
    """The committed offline tokenizers: (CLIPTokenizer, T5Tokenizer)."""
    # transformers is loaded only when tokenizers are made: presets imports this module at start-up
    from transformers import CLIPTokenizer, T5Tokenizer

    return CLIPTokenizer.from_pretrained(CLIP_DIR), T5Tokenizer.from_pretrained(T5_DIR)


if __name__ == "__main__":
    build_tokenizers()
    print(f"wrote {CLIP_DIR} and {T5_DIR}")
