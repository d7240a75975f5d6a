"""The llama2.c BPE tokenizer (``tokenizer.bin`` / ``tok512.bin`` format).

A faithful Python port of ``encode``/``decode`` from Andrej Karpathy's llama2.c ``run.c``
(https://github.com/karpathy/llama2.c, MIT licence). File format: int32 ``max_token_length``, then
for each token a float32 merge score, an int32 byte length and that many bytes (UTF-8 text, or
``<0xXX>`` for the byte-fallback tokens).
"""

from __future__ import annotations

import heapq
import re
import struct
from pathlib import Path

__all__ = ["BOS", "EOS", "Llama2cTokenizer"]

BOS = 1
EOS = 2
_BYTE_OFFSET = 3  # run.c: byte b is encoded as token id b + 3 (ids 0..2 are <unk>, <s>, </s>)
_NO_MERGE = -1e10  # run.c's initial best_score: pairs scoring at or below it are never merged
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


class Llama2cTokenizer:
    """llama2.c tokenizer loaded from ``path``; ``ValueError`` naming the file if it is malformed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{self.path}: cannot read tokenizer file ({exc})") from exc
        pieces: list[bytes] = []
        scores: list[float] = []
        if len(data) < 4:
            raise ValueError(f"{self.path}: not a llama2.c tokenizer (file is {len(data)} bytes)")
        (self.max_token_length,) = struct.unpack_from("<i", data, 0)
        offset = 4
        while offset < len(data):
            if offset + 8 > len(data):
                raise ValueError(f"{self.path}: truncated entry header for token {len(pieces)}")
            score, length = struct.unpack_from("<fi", data, offset)
            offset += 8
            if length < 0 or offset + length > len(data):
                raise ValueError(f"{self.path}: token {len(pieces)} has an invalid length {length}")
            pieces.append(data[offset : offset + length])
            scores.append(score)
            offset += length
        if len(pieces) < _BYTE_OFFSET + 256:
            raise ValueError(
                f"{self.path}: {len(pieces)} tokens, expected at least {_BYTE_OFFSET + 256} "
                "(3 special tokens and 256 byte tokens)"
            )
        self.pieces = pieces
        self.scores = scores
        self._ids: dict[bytes, int] = {}
        for i, piece in enumerate(pieces):
            self._ids.setdefault(piece, i)  # first occurrence wins on (unexpected) duplicates

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text`` exactly as run.c's ``encode``.

        BOS (1) first if ``bos``; a dummy-prefix ``" "`` token if ``text`` is non-empty; one token per
        UTF-8 code point found in the vocabulary, else its bytes as ids ``byte + 3``; then, repeatedly,
        the adjacent pair whose concatenation is the vocabulary entry with the highest score (leftmost
        on ties) is merged until no pair merges; EOS (2) last if ``eos``.
        """
        ids: list[int] = [BOS] if bos else []
        if text:
            space = self._ids.get(b" ")
            if space is None:
                raise ValueError(f"{self.path}: vocabulary has no ' ' token for the dummy prefix")
            body = [space]
            for char in text:
                raw = char.encode("utf-8", errors="surrogatepass")
                tok = self._ids.get(raw)
                if tok is not None:
                    body.append(tok)
                else:
                    body.extend(b + _BYTE_OFFSET for b in raw)
            ids.extend(self._merge(body))
        if eos:
            ids.append(EOS)
        return ids

    def _merge(self, toks: list[int]) -> list[int]:
        """run.c's greedy BPE merge loop, done with a heap + linked list in O(n log n).

        run.c picks the best-scoring pair, the leftmost on ties. Nodes keep their original index and
        their order, so the heap key (-score, left index) pops exactly run.c's choice; stale entries
        are recognised by the token ids they were made from.
        """
        n = len(toks)
        if n < 2:
            return toks
        ids, pieces, scores = self._ids, self.pieces, self.scores
        tok = list(toks)
        nxt = [*range(1, n), -1]
        prv = list(range(-1, n - 1))

        def candidate(left: int) -> tuple[float, int, int, int, int] | None:
            right = nxt[left]
            if right < 0:
                return None
            merged = ids.get(pieces[tok[left]] + pieces[tok[right]])
            if merged is None or scores[merged] <= _NO_MERGE:
                return None
            return (-scores[merged], left, tok[left], tok[right], merged)

        heap = [c for c in map(candidate, range(n - 1)) if c is not None]
        heapq.heapify(heap)
        alive = [True] * n
        while heap:
            _, left, left_tok, right_tok, merged = heapq.heappop(heap)
            right = nxt[left]
            if not alive[left] or right < 0 or tok[left] != left_tok or tok[right] != right_tok:
                continue
            tok[left] = merged
            alive[right] = False
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            for node in (prv[left], left):
                if node >= 0 and (entry := candidate(node)) is not None:
                    heapq.heappush(heap, entry)
        out = []
        i = 0
        while i >= 0:
            out.append(tok[i])
            i = nxt[i]
        return out

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``: the inverse of ``encode`` (``decode(encode(s)) == s`` for any ``s``).

        BOS/EOS are dropped; ``<0xXX>`` pieces become raw bytes; as in run.c, the leading space of the
        piece right after BOS (the dummy prefix) is removed, and so is that of the very first piece
        when there is no BOS. Invalid UTF-8 is replaced by U+FFFD.
        """
        out = bytearray()
        strip_next = True
        for raw_id in ids:
            i = int(raw_id)
            if i == BOS:
                strip_next = True
                continue
            if i == EOS:
                continue
            if not 0 <= i < len(self.pieces):
                raise ValueError(f"token id {i} out of range for a {len(self.pieces)}-token vocabulary")
            piece = self.pieces[i]
            match = _BYTE_PIECE.fullmatch(piece)
            if match:
                piece = bytes([int(match.group(1), 16)])
            elif strip_next and piece.startswith(b" "):
                piece = piece[1:]
            strip_next = False
            out += piece
        return out.decode("utf-8", errors="replace")
