"""The terminal side of `moe-compile run`: a generation's text printed as its tokens arrive, and the
interactive chat (`--chat`)."""

from __future__ import annotations

import sys

from .errors import RequestError

COMMANDS = "/reset starts over, /exit or Ctrl-D ends"


class TextStream:
    """A `stream` callback for `generate`/`chat` that prints the new text of each token (its id where the
    build has no tokenizer)."""

    def __init__(self, model):
        self.model = model
        self.tokens: list[int] = []
        self.printed = ""

    def __call__(self, _row: int, token: int) -> None:
        self.tokens.append(token)
        text = self.model.decode(self.tokens)
        if text is None:
            print(token, end=" ", flush=True)
        elif not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text

    def finish(self) -> None:
        """Print what an incomplete last character held back (as the returned text has it), and end the line."""
        text = self.model.decode(self.tokens)
        print(text[len(self.printed):] if text is not None else "", flush=True)


def messages(system: str | None, user: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def chat(model, system: str | None, max_new_tokens: int | None, options: dict) -> None:
    """Read a user turn, stream the reply, repeat; every turn sends the whole conversation."""
    model.check_chat()
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    print(f"chat with {model.out} ({COMMANDS})", file=sys.stderr)
    history: list[dict] = []
    while True:
        try:
            line = input("> ").strip()
        except EOFError:  # Ctrl-D
            print()
            return
        if line == "/exit":
            return
        if line == "/reset":
            history = []
            print("(new conversation)")
            continue
        if not line:
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]} ({COMMANDS})", file=sys.stderr)
            continue
        turn = messages(system, line) if not history else [*history, {"role": "user", "content": line}]
        stream = TextStream(model)
        try:
            reply = model.chat(turn, max_new_tokens, stream, **options)
        except RequestError as exc:  # e.g. a conversation grown past max_seq: say so, keep the session
            print(f"error: {exc}", file=sys.stderr)
            continue
        stream.finish()
        history = [*turn, {"role": "assistant", "content": reply.text}]
