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
        self.offset = 0  # characters of text before token `done`

    def take(self) -> list[tuple[int, bytes, object, int]]:
        """The newly released tokens: (token id, its bytes, its TokenLogprobs, text offset of its start)."""
        released = len(self.reply.text.encode("utf-8"))
        covered = len(b"".join(self.bytes[t] for t in self.reply.tokens[:self.done]))
        out = []
        while self.done < len(self.reply.tokens) and self.done < len(self.reply.reported):
            token = self.reply.tokens[self.done]
            piece = self.bytes[token] if token < len(self.bytes) else b""
            if covered + len(piece) > released:
                break
            out.append((token, piece, self.reply.reported[self.done], self.offset))
            covered += len(piece)
            self.offset += len(piece.decode("utf-8", "replace")) if piece else 0
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
