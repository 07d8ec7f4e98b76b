"""Builds GPT-2's tokenizer.json (byte-level BPE, 50,257 ids, <|endoftext|> = 50256) from the tiktoken ranks that
openai-whisper's source package ships (`whisper/assets/gpt2.tiktoken`), for machines that reach PyPI but not the
Hugging Face hub. Nothing of it is committed:

    pip download --no-deps openai-whisper==20250625 -d .whl
    python benchmarks/gpt2_tokenizer.py --source=.whl/openai_whisper-20250625.tar.gz --out=.whl/gpt2/tokenizer.json

The merges are recovered from the ranks: a token of rank r is the merge of the two parts that byte-pair encoding
with the ranks below r leaves (the construction of transformers' tiktoken converter). Checked on GPT-2's known ids.
"""
import argparse
import base64
import os
import tarfile

ASSET = "whisper/assets/gpt2.tiktoken"
KNOWN = {"Hello world": [15496, 995], " the": [262], "<|endoftext|>": [50256]}  # GPT-2's published ids


def read_ranks(source: str) -> dict[bytes, int]:
  """token bytes → rank, from the sdist .tar.gz or from the .tiktoken file itself."""
  if source.endswith(".tar.gz"):
    with tarfile.open(source) as tar:
      member = next(m for m in tar.getmembers() if m.name.endswith(ASSET))
      lines = tar.extractfile(member).read().decode().splitlines()
  else:
    with open(source) as f:
      lines = f.read().splitlines()
  return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines if line)}


def byte_to_unicode() -> dict[int, str]:
  """GPT-2's printable stand-ins for the 256 bytes (what the byte-level pre-tokenizer maps bytes to)."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  mapping, extra = {}, 0
  for b in range(256):
    if b in printable:
      mapping[b] = chr(b)
    else:
      mapping[b] = chr(256 + extra)
      extra += 1
  return mapping


def _split(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
  """The two parts that BPE with the ranks below the token's own leaves."""
  parts, limit = [bytes([b]) for b in token], ranks[token]
  while len(parts) > 2:
    pairs = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts[:-1], parts[1:]))]
    rank, i = min(pairs)
    if rank >= limit:
      break
    parts[i:i + 2] = [parts[i] + parts[i + 1]]
  if len(parts) != 2:
    raise ValueError(f"token {token!r} is not the merge of two lower-ranked tokens")
  return parts[0], parts[1]


def build(ranks: dict[bytes, int]):
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  to_text = byte_to_unicode()
  text = lambda b: "".join(to_text[x] for x in b)
  vocab = {text(token): rank for token, rank in ranks.items()}
  merged = sorted((rank, token) for token, rank in ranks.items() if len(token) > 1)
  merges = [tuple(text(p) for p in _split(ranks, token)) for _, token in merged]
  tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
  return tokenizer


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", required=True, help="openai-whisper's sdist .tar.gz, or gpt2.tiktoken")
  parser.add_argument("--out", required=True, help="where to write tokenizer.json")
  args = parser.parse_args()
  tokenizer = build(read_ranks(args.source))
  for sample, ids in KNOWN.items():
    got = tokenizer.encode(sample).ids
    if got != ids:
      raise SystemExit(f"{sample!r} → {got}, GPT-2 gives {ids}: not GPT-2's tokenizer")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  tokenizer.save(args.out)
  print(f"wrote {args.out}: vocabulary {tokenizer.get_vocab_size()}, checked on {list(KNOWN)}")


if __name__ == "__main__":
  main()
