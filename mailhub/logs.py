"""What mailhub writes to its log: escaped, without secrets.

- :func:`printable` escapes control characters (CR, LF, ESC...) in text that a
  client chose (a login, a path, a header), so no client can forge a log line
  or a terminal sequence: apply it to such fields at the log call.
- :func:`redact_uri` and :func:`redact_url` hide secrets: the ``token``,
  ``password`` and ``pass`` query parameters of a request's URI, the password
  of a DSN or broker URL.
- :func:`access_log_formatter` is the Site's access log: Twisted's combined
  log format with the URI redacted.
- :func:`route_radicale_logging` sends the embedded Radicale's ``logging``
  records to twisted.logger, warnings and above only, without tracebacks for
  what is a client's fault.
- :func:`startup_summary` is the one line that says what this process uses.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from twisted.logger import Logger, LogLevel

#: Query parameters whose values never reach a log line.
SECRET_PARAMETERS = frozenset(["token", "password", "pass", "passwd", "secret"])

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape_char(match: "re.Match[str]") -> str:
    char = match.group()
    named = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}.get(char)
    if named is not None:
        return named
    code = ord(char)
    return "\\x%02x" % code if code < 0x100 else "\\u%04x" % code


def printable(text: Any) -> str:
    """``text`` (str, or bytes read as UTF-8) with control characters escaped.

    Backslashes are doubled, so an escaped value cannot be mistaken for one
    that a client wrote with backslashes of its own.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    elif not isinstance(text, str):
        text = str(text)
    return _CONTROL.sub(_escape_char, text.replace("\\", "\\\\"))


def _redact_query(query: str) -> str:
    if not query:
        return query
    kept = []
    for part in query.split("&"):
        name, equals, _ = part.partition("=")
        try:
            plain = parse_qsl(name + "=x", keep_blank_values=True)[0][0]
        except (IndexError, ValueError):
            plain = name
        if equals and plain.strip().lower() in SECRET_PARAMETERS:
            part = name + "=***"
        kept.append(part)
    return "&".join(kept)


def redact_uri(uri: bytes | str) -> str:
    """A request URI (path and query) with secret parameters replaced by ``***``."""
    if isinstance(uri, bytes):
        uri = uri.decode("latin-1")
    path, question, query = uri.partition("?")
    if not question:
        return uri
    query, hash_, fragment = query.partition("#")
    return path + "?" + _redact_query(query) + hash_ + fragment


def redact_url(url: str) -> str:
    """A DSN or URL without its password: in the user part or in the query."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not even a URL: hide whatever sits between ':' and '@'
        return re.sub(r"(//[^/:@]*):[^/@]*@", r"\1:***@", url)
    query = _redact_query(parts.query)
    if password is None and query == parts.query:
        return url  # as written (urlunsplit would turn sqlite:///x into sqlite://x)
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = "%s:***@%s" % (userinfo.partition(":")[0], hostport)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _quoted(value: Any) -> str:
    """Combined-log-format quoting, as Twisted's: a bytes repr inside double quotes."""
    if not isinstance(value, bytes):
        value = str(value).encode("latin-1", "backslashreplace")
    text = repr(value)[1:]
    if text.startswith("'"):
        return text[1:-1].replace('"', '\\"').replace("\\'", "'")
    return text[1:-1]


def access_log_formatter(timestamp: str, request: Any) -> str:
    """One access-log line, as Twisted's combined log format, with secrets redacted.

    Twisted's own formatter writes the whole URI, so a site token or a
    MailStore password sent in the query string would reach the log.
    """
    address = request.getClientAddress()
    host = getattr(address, "host", None) or "-"
    return '"%s" - - %s "%s %s %s" %d %s "%s" "%s"' % (
        _quoted(host), timestamp, _quoted(request.method),
        _quoted(redact_uri(request.uri)),
        _quoted(request.clientproto), request.code, request.sentLength or "-",
        _quoted(request.getHeader(b"referer") or b"-"),
        _quoted(request.getHeader(b"user-agent") or b"-"))


class _TwistedHandler(logging.Handler):
    """A ``logging`` handler that re-emits records on a twisted.logger Logger."""

    _levels = [(logging.CRITICAL, LogLevel.critical), (logging.ERROR, LogLevel.error),
               (logging.WARNING, LogLevel.warn), (logging.INFO, LogLevel.info)]

    def __init__(self, log: Logger) -> None:
        super().__init__()
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record must not break a request
            message = str(record.msg)
        level = LogLevel.debug
        for threshold, twisted_level in self._levels:
            if record.levelno >= threshold:
                level = twisted_level
                break
        # Warnings are a client's fault (a malformed body): the message says
        # enough. Errors are ours: keep the traceback, escaped, in one field.
        trace = ""
        if record.exc_info and record.levelno >= logging.ERROR:
            trace = " | " + (self.formatter or logging.Formatter()).formatException(
                record.exc_info)
        self._log.emit(level, "radicale: {message}{trace}", message=printable(message),
                       trace=printable(trace))


_radicale_log = Logger(namespace="radicale")


def route_radicale_logging(level: int = logging.WARNING) -> None:
    """Send the ``radicale`` logger's records at ``level`` and above to twisted.logger.

    Radicale logs every request at INFO and, left alone, writes tracebacks
    to stderr for a client's malformed body. Idempotent.
    """
    logger = logging.getLogger("radicale")
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        if isinstance(handler, _TwistedHandler):
            return
    logger.addHandler(_TwistedHandler(_radicale_log))


def startup_summary(config: Any, listen: str) -> dict[str, str]:
    """What this process uses, fit to log: no password, no token."""
    if config.embedded_carddav:
        carddav = "embedded at %s/dav/" % config.mailhub.site_url.rstrip("/")
    else:
        carddav = "external at %s" % redact_url(config.carddav.url)
    return {
        "listen": redact_url(listen) if "://" in listen else _redact_endpoint(listen),
        "data": str(config.data_dir.absolute()),
        "database": redact_url(config.dsn),
        # Several nodes of a cluster: each URL's password hidden.
        "broker": " ".join(redact_url(u) for u in re.split(r"[,\s]+", config.amqp.url)
                           if u) or "none (local pubsub)",
        "carddav": carddav,
        "ldap": " ".join(redact_url(u) for u in config.ldap.url.split()) or "none",
        "config": config.source,
    }


def _redact_endpoint(description: str) -> str:
    """A Twisted endpoint string with any ``password=`` value hidden."""
    return re.sub(r"((?:^|:)(?:password|passphrase)=)[^:]*", r"\1***", description,
                  flags=re.IGNORECASE)
