"""Text that reaches a terminal: shown escaped, and command lines quoted for pasting.

Paths, names, log lines and reasons can hold anything a file name can: an ESC that starts
``\\e]0;…`` (retitles the window) or ``\\e[2J`` (clears it), other C0 and C1 controls, DEL,
the bidirectional overrides that make text read other than it is, and (from names that are
not UTF-8) lone surrogates that cannot even be encoded. :func:`printable` is the one place
that turns such characters into visible escapes (``\\x1b``, ``\\u202e``); every text loractl
prints, and every notification it sends, goes through it. :func:`shell_join` quotes a
command line so that pasting it runs exactly that command, and never a character of it
reaches the terminal raw. Nothing here imports anything but the standard library.
"""

from __future__ import annotations

import re
import shlex

__all__ = ["printable", "shell_join", "shell_quote"]

# C0 controls but tab and newline, DEL and C1 controls, the bidirectional marks, embeddings,
# overrides and isolates, the Unicode line and paragraph separators, and lone surrogates.
_ALWAYS = (
    "\x00-\x08\x0b-\x1f\x7f-\x9f"
    "\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
    "\ud800-\udfff"
)
_UNSAFE_LINE = re.compile(f"[\t\n{_ALWAYS}]")
_UNSAFE_MULTILINE = re.compile(f"[{_ALWAYS}]")


def _escape(char: str) -> str:
    code = ord(char)
    if code == 0x0A:
        return "\\n"
    if code == 0x09:
        return "\\t"
    if code == 0x0D:
        return "\\r"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: object, *, multiline: bool = False) -> str:
    """``value`` as text that is safe to write to a terminal: every control character,
    bidirectional override and lone surrogate shown as its escape. With ``multiline``, tabs
    and newlines are kept, for text whose lines are its structure (a reason, a log)."""
    text = value if isinstance(value, str) else str(value)
    pattern = _UNSAFE_MULTILINE if multiline else _UNSAFE_LINE
    return pattern.sub(lambda match: _escape(match.group()), text)


def _ansi_c_escape(char: str) -> str:
    code = ord(char)
    if char in "\\'":
        return "\\" + char
    if 0xDC80 <= code <= 0xDCFF:  # a byte of a name that is not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def shell_quote(word: str) -> str:
    """One argument quoted for a POSIX shell. A word with a control character, which
    ``shlex.quote`` would leave raw inside its quotes, is spelled ``$'…'`` with escapes
    instead (bash, zsh and ksh read it back as the very same word)."""
    if not _UNSAFE_LINE.search(word):
        return shlex.quote(word)
    body = "".join(
        _ansi_c_escape(char) if _UNSAFE_LINE.match(char) or char in "\\'" else char for char in word
    )
    return f"$'{body}'"


def shell_join(argv: list[str]) -> str:
    """A command line to paste: each argument quoted by :func:`shell_quote`."""
    return " ".join(shell_quote(word) for word in argv)
