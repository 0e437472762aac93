"""Word wrapping of streamed text for the chat REPL: pieces of a reply arrive token by token, and the terminal should
break lines between words, not inside them (which is what a terminal does on its own). Text inside ``` fences is
passed through as it comes: code keeps its lines, so what is copied from the screen is what the model wrote."""

from __future__ import annotations

from collections.abc import Callable


class StreamWrap:
    """Feed pieces with :meth:`feed`, then :meth:`close`; ``emit`` receives the text to show. ``width`` columns (a
    width below 10 turns wrapping off). A word is held back until the whitespace after it arrives, then shown on the
    current line if it fits, else on the next; a word longer than the line is broken."""

    def __init__(self, emit: Callable[[str], None], width: int):
        self.emit = emit
        self.width = width if width >= 10 else 0
        self.col = 0  # characters on the current screen line
        self.word = ""  # the word being received
        self.space = ""  # whitespace seen after the last shown word, not yet shown
        self.line = ""  # the current source line so far (to spot ``` fences)
        self.fenced = False

    def feed(self, text: str) -> None:
        if not self.width:
            self.emit(text)
            return
        for ch in text:
            self._char(ch)

    def close(self) -> None:
        if self.width:
            self._word()  # (trailing blanks are not shown)
            self.space = ""

    def _char(self, ch: str) -> None:
        if self.fenced:
            self._out(ch)
            self._track(ch)
            return
        if ch == "\n":
            self._word()
            self.space = ""
            self._out("\n")
            self._track(ch)
        elif ch in " \t":
            self._word()
            self.space += ch
            self._track(ch)
        else:
            self.word += ch
            self._track(ch)

    def _track(self, ch: str) -> None:
        """Follow source lines: a line starting with ``` opens or closes a fence."""
        if ch == "\n":
            if self.line.lstrip().startswith("```"):
                self.fenced = not self.fenced
            self.line = ""
        else:
            self.line += ch

    def _word(self) -> None:
        if not self.word:
            return
        word, self.word = self.word, ""
        if self.col and self.col + len(self.space) + len(word) > self.width:
            self._out("\n")
            self.space = ""
        elif self.space:
            self._out(self.space)
        self.space = ""
        while len(word) > self.width:  # longer than a line: broken
            room = self.width - self.col
            self._out(word[:room] + "\n")
            word = word[room:]
        self._out(word)

    def _out(self, text: str) -> None:
        if not text:
            return
        self.emit(text)
        last = text.rfind("\n")
        self.col = len(text) - last - 1 if last >= 0 else self.col + len(text)
