"""Detokenizer: the pieces pushed token by token add up to the text decoded at once, in bounded work per token."""
import pytest

from mesanet_jax.data import text
from mesanet_jax.data.detokenize import Detokenizer


class _CountingTokenizer:
  """Wraps a tokenizer and records how many tokens each decode call was given."""

  def __init__(self, tokenizer):
    self.tokenizer, self.sizes = tokenizer, []

  def decode(self, ids):
    self.sizes.append(len(ids))
    return self.tokenizer.decode(ids)


def _pieces(tokenizer, context, generated):
  detokenizer = Detokenizer(tokenizer, context=context)
  return [detokenizer.push(t) for t in generated]


def test_bytes_split_characters_wait_for_their_last_byte():
  tokenizer = _CountingTokenizer(text.ByteTokenizer())
  generated = list(text.ByteTokenizer().encode("naïve café — 価格 € " * 40))
  pieces = _pieces(tokenizer, [0], generated)
  assert "".join(pieces) == text.ByteTokenizer().decode(generated)
  assert "\ufffd" not in "".join(pieces) and pieces.count("") > 40  # "価" is 3 bytes: two pushes print nothing
  assert max(tokenizer.sizes) <= 6  # the last piece and the next (3 bytes each at most here), never the whole output


def test_sentencepiece_keeps_the_spaces_between_pieces(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  docs = text.read_documents(text.DEFAULT_CORPUS)
  spm.SentencePieceTrainer.train(sentence_iterator=iter(docs[:100]), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=400, model_type="unigram", bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
  sp = text.make_tokenizer(str(tmp_path / "sp.model"))
  prompt, generated = list(sp.encode("The government said")), list(sp.encode(" that the fire was under control"))
  tokenizer = _CountingTokenizer(sp)
  pieces = _pieces(tokenizer, [sp.bos_id, *prompt], generated)
  # Decoding a token alone would drop the space a SentencePiece piece starts with.
  whole = sp.decode(prompt + generated)
  assert sp.decode(prompt) + "".join(pieces) == whole and "".join(pieces).startswith(" that")
  assert max(tokenizer.sizes) <= 6
