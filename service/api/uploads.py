"""Multipart uploads: the filename limit, and why the multipart parser refused a body.

Starlette answers every body the multipart parser refuses with a bare "Invalid multipart data.";
the parser's own exception, chained to that answer, says why. The usual reason is a header line
past the parser's size limit (about 4 KB), which in practice means a filename of kilobytes: the
client is told so, with the limit a filename must keep (:data:`MAX_FILENAME_BYTES`, checked on the
filenames that do get through the parser).
"""

from __future__ import annotations

from python_multipart.exceptions import FormParserError

MAX_FILENAME_BYTES = 255
"""Longest accepted upload filename in UTF-8 bytes, as on common file systems: the name is echoed in
every answer and error about its file."""

FILENAME_TOO_LONG = f"filename too long; the limit is {MAX_FILENAME_BYTES} bytes"

_HEADER_TOO_LONG = "maximum header size exceeded"  # python-multipart's words for a header line past its limit


def parser_refusal(error: BaseException) -> FormParserError | None:
    """The multipart parser's exception behind ``error`` (its cause or context, at any depth), if any."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, FormParserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def is_header_too_long(refusal: FormParserError) -> bool:
    """Whether the parser refused a part's header line for its length (a filename of kilobytes)."""
    return str(refusal).lower().startswith(_HEADER_TOO_LONG)
