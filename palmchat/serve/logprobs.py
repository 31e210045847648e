"""Log-probs as OpenAI's APIs report them, from the TokenLogprobs the sampler recorded for each reply token (the
raw model distribution: temperature 1, before penalties, bias, constraints and filters).

Only tokens whose text was released are reported: a token cut by a stop string, or whose text is still held back,
is not (yet). `LogprobsCursor` hands each streamed chunk the tokens its text completed.

- Chat Completions: choice.logprobs = {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
  "logprob", "bytes"}]}], "refusal": None}
- completions: choice.logprobs = {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}
  (offsets into the choice's text)
"""

from __future__ import annotations

from palmchat.serve.structured import token_bytes_of


class LogprobsCursor:
    """Which of a reply's tokens are released, chunk after chunk."""

    def __init__(self, tokenizer, reply):
        self.bytes = token_bytes_of(tokenizer)
        self.reply = reply
        self.done = 0  # tokens reported so far
        self.covered = 0  # bytes those tokens spell
        self.offset = 0  # characters of text before token `done`
        self.spelled, self.spelled_upto = 0, 0  # bytes the first `spelled_upto` tokens spell
        # UTF-8 bytes of the reply's released and decoded text (both only ever appended to), and their lengths then
        self.text_bytes, self.text_seen = 0, 0
        self.decoded_bytes, self.decoded_seen = 0, 0

    def piece(self, token: int) -> bytes:
        return self.bytes[token] if token < len(self.bytes) else b""  # a model's padding ids spell nothing

    def take(self) -> list[tuple[int, bytes, object, int]]:
        """The newly released tokens: (token id, its bytes, its TokenLogprobs, text offset of its start)."""
        reply = self.reply
        while self.spelled_upto < reply.decoded_upto:
            self.spelled += len(self.piece(reply.tokens[self.spelled_upto]))
            self.spelled_upto += 1
        # a SentencePiece-style decode drops the leading space its first token spells: the released text counts
        # as many bytes as the tokens spell beyond the decoded text (of which the released text is a prefix)
        self.text_bytes += len(reply.text[self.text_seen:].encode("utf-8"))
        self.decoded_bytes += len(reply.decoded[self.decoded_seen:].encode("utf-8"))
        self.text_seen, self.decoded_seen = len(reply.text), len(reply.decoded)
        released = self.text_bytes + max(0, self.spelled - self.decoded_bytes)
        out = []
        while self.done < min(len(reply.tokens), len(reply.reported)):
            token = reply.tokens[self.done]
            piece = self.piece(token)
            if self.covered + len(piece) > released:
                break
            out.append((token, piece, reply.reported[self.done], self.offset))
            self.covered += len(piece)
            self.offset += len(_text(piece))
            self.done += 1
        return out


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", "replace")


def chat_logprobs(cursor: LogprobsCursor) -> dict:
    """A chat choice's (or chunk's) `logprobs` for the tokens released since the last call."""
    content = []
    for _, piece, reported, _ in cursor.take():
        top = [{"token": _text(cursor.bytes[t]), "logprob": lp, "bytes": list(cursor.bytes[t])}
               for t, lp in reported.top]
        content.append({"token": _text(piece), "logprob": reported.logprob, "bytes": list(piece), "top_logprobs": top})
    return {"content": content, "refusal": None}


def completion_logprobs(cursor: LogprobsCursor) -> dict:
    """A completions choice's (or chunk's) `logprobs` for the tokens released since the last call."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for _, piece, reported, offset in cursor.take():
        out["tokens"].append(_text(piece))
        out["token_logprobs"].append(reported.logprob)
        out["top_logprobs"].append({_text(cursor.bytes[t]): lp for t, lp in reported.top})
        out["text_offset"].append(offset)
    return out
