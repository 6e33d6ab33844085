"""Text in and out of the server: OpenAI chat messages -> ChatGLM's prompt, and streamed text.

Prompts follow the original `chat()`: the query alone, or `[Round i]\\n问：...\\n答：...\\n` rounds
(`generation.build_prompt`). Answers are post-processed as `chat()` does (`process_response`).

Streaming sends only text that can no longer change: the end of a partial answer is held back
while it could still become something else (an ASCII mark the original turns into a CJK one when a
CJK character follows, an incomplete UTF-8 character, the start of a stop string or of the
`[[训练时间]]` placeholder), so the streamed pieces always add up to the final answer.
"""
from __future__ import annotations

from ..generation import build_prompt, process_response

PLACEHOLDER = "[[训练时间]]"
CHANGING_MARKS = ",!:;?"  # process_response may turn these into CJK marks once the next character is known


class BadRequest(ValueError):
    """A request the server refuses with HTTP 400; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def message_text(message, index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: text only
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(f"messages[{index}].content[{j}]: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"messages[{index}].content must be a string or a list of text parts", "messages")


def messages_to_chat(messages) -> tuple[str, list[tuple[str, str]]]:
    """OpenAI `messages` -> (query, history) as `chat()` takes them.

    Optional `system` messages first (ChatGLM-6B has no system role: their text is put before the
    first user message), then user/assistant turns alternating, ending with a user message.
    """
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    system, turns = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object with role and content", "messages")
        role = message.get("role")
        text = message_text(message, i)
        if role == "system":
            if turns:
                raise BadRequest(f"messages[{i}]: system messages must come before the conversation", "messages")
            system.append(text)
        elif role in ("user", "assistant"):
            expected = "user" if len(turns) % 2 == 0 else "assistant"
            if role != expected:
                raise BadRequest(f"messages[{i}] has role {role!r}, expected {expected!r}: user and assistant "
                                 "messages alternate, starting with user", "messages")
            turns.append(text)
        else:
            raise BadRequest(f"messages[{i}] has role {role!r}; supported: system, user, assistant", "messages")
    if len(turns) % 2 == 0:
        raise BadRequest("the last message must be from the user", "messages")
    if system:
        turns[0] = "\n".join(system + [turns[0]])
    history = [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)]
    return turns[-1], history


def chat_prompt(query: str, history) -> str:
    return build_prompt(query, history)


def _held_back(text: str, stops) -> int:
    """How many characters at the end of `text` may still change."""
    hold = 0
    if text.endswith("\ufffd"):  # an incomplete multi-byte character
        hold = len(text) - len(text.rstrip("\ufffd"))
    if text and text[-1] in CHANGING_MARKS:
        hold = max(hold, 1)
    start = text.rfind("[[")
    if start >= 0 and PLACEHOLDER.startswith(text[start:]):
        hold = max(hold, len(text) - start)
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):  # the longest tail that starts a stop string
            if stop.startswith(text[-n:]):
                hold = max(hold, n)
                break
    return hold


class TextStream:
    """Token ids in, final-safe text pieces out, with stop strings.

    `push(id)` returns `(piece, stopped)`: the new text that can be sent, and whether a stop string
    appeared (the text is then cut before it and the answer is over). `finish()` returns what was held
    back. `text` is the whole answer so far as `chat()` would return it.
    """

    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.sent = ""

    def _render(self) -> tuple[str, bool]:
        text = process_response(self.tokenizer.decode(self.ids))
        cut = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cut:
            return text[:min(cut)], True
        return text, False

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(int(token_id))
        self.text, stopped = self._render()
        ready = self.text if stopped else self.text[:len(self.text) - _held_back(self.text, self.stop)]
        return self._advance(ready), stopped

    def finish(self) -> str:
        return self._advance(self.text)

    def _advance(self, ready: str) -> str:
        if not ready.startswith(self.sent):  # the decoded text changed behind what was sent: wait
            return ""
        piece, self.sent = ready[len(self.sent):], ready
        return piece
