"""SMTP replies: a code and one or more text lines (enhanced code included)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sendooway_shared.log import printable

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_ENHANCED_WORD = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |\Z)")
LOG_TEXT = 1000  # characters of a reply shown in a log line


@dataclass(frozen=True)
class Reply:
    """One SMTP reply. `lines` hold the text after the code, e.g.
    Reply(250, ("2.1.0 OK",)). Multi-line replies keep every line."""

    code: int
    lines: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code {self.code} outside 200..599")
        for line in self.lines:
            if "\r" in line or "\n" in line or "\0" in line:
                raise ValueError("reply text must not contain CR, LF or NUL")

    @property
    def enhanced(self) -> str:
        """The enhanced status code the text starts with (RFC 3463), or ""."""
        word = self.lines[0].split(" ", 1)[0] if self.lines else ""
        return word if _ENHANCED.fullmatch(word) else ""

    def with_enhanced(self, success: str) -> "Reply":
        """This reply with an enhanced status code on every line when it has
        none (RFC 2034: once ENHANCEDSTATUSCODES is advertised, every 2xx,
        4xx and 5xx reply carries one): `success` is the detail for a 2xx
        ("1.0" for MAIL, "1.5" for RCPT, "0.0" for the message), a failure
        gets the generic 4.0.0 / 5.0.0. A reply whose first line has a code
        lends it to its other lines that lack one (RFC 2034 3: each line of
        a multi-line reply starts with the same code). The text itself is
        kept."""
        if 300 <= self.code < 400:
            return self
        status = self.enhanced
        if status:
            if all(_ENHANCED_WORD.match(t) for t in self.lines):
                return self
        else:
            status = f"{self.code // 100}.{success if self.code < 300 else '0.0'}"
        return Reply(self.code, tuple(t if _ENHANCED_WORD.match(t)
                                      else f"{status} {t}" if t else status
                                      for t in self.lines or ("",)))

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    def to_bytes(self) -> bytes:
        lines = self.lines or ("",)
        out = []
        for i, text in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            # An empty 334 challenge keeps its space (RFC 4954: "334" SP [base64]);
            # other empty texts end at the code (RFC 5321: [ SP textstring ]).
            bare = not text and sep == " " and self.code != 334
            out.append(f"{self.code}\r\n" if bare else f"{self.code}{sep}{text}\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        """The reply as a log line shows it: an upstream's text escaped (a
        bidi override or an odd octet it sent cannot reorder or garble the
        line) and cut at LOG_TEXT characters (it may send 100 lines of 4
        KiB: syslog cuts or drops such a line), escapes counted."""
        shown = printable(" / ".join(f"{self.code} {t}" for t in (self.lines or ("",))), LOG_TEXT)
        return shown if len(shown) <= LOG_TEXT + 3 else shown[:LOG_TEXT] + "..."
