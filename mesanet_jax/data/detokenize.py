"""Incremental detokenisation: the text of a growing token sequence, one piece per new token, in constant work.

Decoding the whole output again for every new token costs O(n) per token; decoding a token alone is wrong for
tokenizers whose pieces depend on their neighbours (SentencePiece drops the space of a call's first piece; a byte
tokenizer splits multi-byte characters). `Detokenizer` decodes a short window instead: the tokens since the last
piece it emitted plus the ones before them as context, and emits the window's text beyond the context's (the
offsets scheme of vLLM's incremental detokenizer and Hugging Face's TextStreamer).
"""
from typing import Sequence

_INCOMPLETE = "\ufffd"  # what a decoder emits for the first bytes of a character whose rest is still to come


class Detokenizer:
  """push(token) -> the new text since the last push ("" while a character is incomplete).

  `context`: tokens already shown (e.g. the prompt's last few), so the first generated piece is decoded after them;
  only the last ones are kept. The window holds the context of the last emitted piece and the tokens since, so each
  push decodes a few tokens whatever the length of the output.
  """

  def __init__(self, tokenizer, context: Sequence[int] = (), context_tokens: int = 4):
    self.tokenizer = tokenizer
    self.window = [int(t) for t in context][-context_tokens:]  # [context of the last piece | tokens not yet shown]
    self.shown = len(self.window)  # window[:shown] has been shown

  def push(self, token: int) -> str:
    self.window.append(int(token))
    before = self.tokenizer.decode(self.window[:self.shown])
    text = self.tokenizer.decode(self.window)
    if text.endswith(_INCOMPLETE) or len(text) <= len(before) or not text.startswith(before):
      return ""
    # The tokens just shown become the next piece's context.
    self.window, self.shown = self.window[self.shown:], len(self.window) - self.shown
    return text[len(before):]
