#!/usr/bin/env python3
"""Example optinsync exec connector, role `crm`: a CRM kept in a JSON-lines file.

Speaks optinsync connector protocol version 1 (docs/connector-protocol.md) on stdin/stdout.
Python 3.11+, standard library only, one self-contained file: copy it and adapt.

Settings (the `[connectors.crm.settings]` table, received in `configure`):
  path             JSONL file of contacts, an append-only change log: one object per line,
                   {"id": "17", "email": "...", "language": "en", "opted_out": false,
                    "lists": ["newsletter"], "fields": {...}, "modified_at": "...Z",
                    "deleted": false}; a later line for an id replaces the earlier ones.
  write_back_path  JSONL file each consent write-back is appended to, once per `key`.
  webhook_secret   optional; a POST must carry it in the `x-webhook-secret` header.
  module           optional module name for record references (default "Contacts").
Relative paths are resolved against `base_dir` (the directory of optinsync's config file).

The change cursor is the byte offset into `path` after the last line handed out, so a
restarted connector resumes exactly where the engine's stored cursor says.
"""

import hmac
import json
import os
import sys
import traceback
from datetime import datetime, timezone

PROTOCOL_VERSION = 1
CONNECTOR = "example-file-crm 1.0"
ROLES = ["crm"]
# Capabilities are declared in `hello`, before the settings arrive, so `webhook` is always
# declared; without a `webhook_secret` every POST is refused instead.
CAPABILITIES = ["webhook"]
MAX_LINE = 16 * 1024 * 1024  # the protocol's line limit
DEFAULT_LIMIT = 500


# --- protocol plumbing (the same in every example; kept in-file so one file can be copied) ---


class ConnectorError(Exception):
    """An ERROR object: `kind` decides what the engine does with the work."""

    def __init__(self, kind, message, **extra):
        super().__init__(message)
        self.body = {"kind": kind, "message": message, **extra}


def transient(message, retry_after_ms=None, scope="service"):
    extra = {"scope": scope}
    if retry_after_ms is not None:
        extra["retry_after_ms"] = int(retry_after_ms)
    return ConnectorError("transient", message, **extra)


def permanent(message):
    return ConnectorError("permanent", message)


def config_error(setting, message):
    return ConnectorError("config", message, setting=setting)


def invalid_input(message):
    return ConnectorError("invalid_input", message)


def log(message):
    # stderr is the log; stdout carries protocol lines only.
    sys.stderr.write(f"file_crm: {message}\n")
    sys.stderr.flush()


def mask(email):
    """`an***@example.org`: enough to follow a case in the log, not the address itself."""
    if not isinstance(email, str) or "@" not in email:
        return "***"
    local, _, domain = email.rpartition("@")
    return f"{local[:2]}***@{domain}"


def send(message):
    # ensure_ascii keeps the line pure ASCII (no encoding surprises); JSON escapes newlines.
    sys.stdout.write(json.dumps(message, ensure_ascii=True, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def read_lines(stream):
    """Yield stdin lines; a line over the protocol limit is drained and reported as None."""
    while True:
        line = stream.readline(MAX_LINE + 1)
        if not line:
            return
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            while True:  # skip the rest of the over-long line
                rest = stream.readline(MAX_LINE)
                if not rest or rest.endswith(b"\n"):
                    break
            yield None
            continue
        yield line


def serve(connector):
    """Answer every request exactly once, in order, until `shutdown` or end of input."""
    configured = False
    for raw in read_lines(sys.stdin.buffer):
        if raw is None:
            log("ignored a request line longer than 16 MiB")
            continue
        if not raw.strip():
            continue
        try:
            message = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            log(f"ignored a line that is not JSON ({e.__class__.__name__})")
            continue
        if not isinstance(message, dict):
            log("ignored a line that is not a JSON object")
            continue
        method, params, rid = message.get("method"), message.get("params"), message.get("id")
        if rid is None:
            # Notifications get no answer. `cancel` needs no work here: requests are served
            # one at a time, so a cancelled one has already been answered (the engine
            # ignores that late answer).
            if method != "cancel":
                log(f"ignored notification {method!r}")
            continue
        if isinstance(rid, bool) or not isinstance(rid, int) or rid < 0:
            log("ignored a request whose id is not an unsigned integer")
            continue
        if not isinstance(params, dict):
            params = {}
        try:
            if method == "hello":
                result = hello(params)
            elif method == "shutdown":
                send({"id": rid, "result": {}})
                log("shutdown requested")
                sys.exit(0)
            elif method not in connector.METHODS:
                raise permanent(f"unknown method {method!r}")
            elif method == "configure":
                result = connector.configure(
                    params.get("settings") or {}, params.get("base_dir"), params.get("state")
                )
                configured = True
            elif not configured:
                raise permanent(f"{method} before configure")
            else:
                result = getattr(connector, method)(params)
            send({"id": rid, "result": result})
        except ConnectorError as e:
            send({"id": rid, "error": e.body})
        except OSError as e:
            # Disk or file trouble is usually passing (full disk, a file being replaced):
            # retry later rather than dead-letter the work.
            log(f"{method}: I/O error: {e.__class__.__name__}: {e.strerror}")
            send({"id": rid, "error": transient(f"I/O error: {e.strerror}").body})
        except Exception as e:  # a bug here must not take the whole connector down
            # The frames, not the exception text: that may quote data (an address, a setting).
            frames = "".join(traceback.format_tb(e.__traceback__))
            log(f"{method}: internal error: {e.__class__.__name__}\n{frames}")
            send({"id": rid, "error": permanent(f"internal error in connector: {e.__class__.__name__}").body})
    sys.exit(0)  # end of input: the engine went away or closed stdin after shutdown


def hello(params):
    offered = params.get("protocol_versions") or []
    if PROTOCOL_VERSION not in offered:
        raise config_error("command", f"speaks protocol {PROTOCOL_VERSION} only; offered {offered}")
    if params.get("role") not in ROLES:
        log(f"started for role {params.get('role')!r}, but serves {ROLES}")
    return {
        "protocol_version": PROTOCOL_VERSION,
        "connector": CONNECTOR,
        "roles": ROLES,
        "capabilities": CAPABILITIES,
        "max_batch": 1,
        "status_interval_ms": None,
    }


def resolve(base_dir, path):
    if os.path.isabs(path):
        return path
    return os.path.join(base_dir if isinstance(base_dir, str) and base_dir else os.getcwd(), path)


def rfc3339(value):
    """The time as RFC 3339 UTC, or None if it is not a time with an offset."""
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    # The engine needs an absolute instant; a time without offset is ambiguous.
    if "T" not in value or t.tzinfo is None:
        return None
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def email_problem(email):
    """Why `email` is not an address (a shallow check: the engine normalises), or None."""
    if email is None or email == "":
        return "no email"
    if not isinstance(email, str):
        return "email is not a string"
    if len(email) > 254 or any(c.isspace() or ord(c) < 32 for c in email):
        return "malformed email"
    local, at, domain = email.rpartition("@")
    if not at or not local or "." not in domain or domain.startswith(".") or domain.endswith("."):
        return "malformed email"
    return None


# --- the CRM ---


class FileCrm:
    METHODS = {"configure", "health", "changes", "fetch", "write_back", "webhook"}

    def configure(self, settings, base_dir, state):
        def text(name, required):
            value = settings.get(name)
            if value is None and not required:
                return None
            if not isinstance(value, str) or not value:
                raise config_error(name, "missing" if value is None else "must be a non-empty string")
            return value

        self.path = resolve(base_dir, text("path", True))
        if not os.path.isfile(self.path):
            raise config_error("path", f"no such file: {self.path}")
        self.write_back_path = resolve(base_dir, text("write_back_path", True))
        if not os.path.isdir(os.path.dirname(self.write_back_path) or "."):
            raise config_error("write_back_path", "its directory does not exist")
        self.secret = text("webhook_secret", False)
        self.module = text("module", False) or "Contacts"
        self.written = self.load_written_keys()
        self.line_at = None  # ((inode, offset), line number) where the last page ended
        log(f"configured: module {self.module}, {len(self.written)} write-backs already done, "
            f"webhook {'enabled' if self.secret else 'disabled'}")
        return {}

    # Reading the change log.

    def parse(self, raw):
        """One line → (id or None, kind, value) with kind record | deleted | invalid | blank."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid", "not UTF-8"
        if not text.strip():
            return None, "blank", None
        try:
            c = json.loads(text)
        except json.JSONDecodeError:
            return None, "invalid", "not valid JSON"
        if not isinstance(c, dict):
            return None, "invalid", "not a JSON object"
        rid = c.get("id")
        if isinstance(rid, int) and not isinstance(rid, bool):
            rid = str(rid)
        if not isinstance(rid, str) or not rid:
            return None, "invalid", "no id"
        ref = {"module": self.module, "id": rid}
        if c.get("deleted") is True:
            return rid, "deleted", ref
        # Reasons never quote the address: they end up in the engine's log and reports.
        problem = email_problem(c.get("email"))
        if problem is None and not isinstance(c.get("language"), (str, type(None))):
            problem = "language is not a string"
        if problem is None and not isinstance(c.get("opted_out", False), bool):
            problem = "opted_out is not true or false"
        lists = c.get("lists", [])
        if problem is None and not (isinstance(lists, list) and all(isinstance(x, str) for x in lists)):
            problem = "lists is not a list of strings"
        fields = c.get("fields", {})
        if problem is None and not isinstance(fields, dict):
            problem = "fields is not an object"
        modified = c.get("modified_at")
        if problem is None and modified is not None:
            modified = rfc3339(modified)
            if modified is None:
                problem = "modified_at is not an RFC 3339 time with offset"
        if problem is not None:
            return rid, "invalid", problem
        return rid, "record", {
            "record": ref,
            "email": c["email"],
            "language": c.get("language"),
            "opted_out": c.get("opted_out", False),
            "asserted_lists": lists,
            "fields": fields,
            "modified_at": modified,
        }

    def lines_from(self, f, offset):
        """Complete lines from `offset` on, as (line number, start, end, bytes).

        A last line without its newline is still being written: it is left for a later call.
        """
        # The line number at the cursor, for `line N` locations: remembered from the page
        # before (counting from the start for every page made a pull quadratic in the file's
        # size: minutes for a million lines), counted when the cursor is another one.
        ino = os.fstat(f.fileno()).st_ino
        if self.line_at is not None and self.line_at[0] == (ino, offset):
            number = self.line_at[1]
        else:
            f.seek(0)
            number = 1
            remaining = offset
            while remaining > 0:  # count the lines before the cursor
                chunk = f.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                number += chunk.count(b"\n")
                remaining -= len(chunk)
        f.seek(offset)
        start = offset
        while True:
            raw = f.readline()
            if not raw.endswith(b"\n"):
                return
            yield number, start, start + len(raw), raw
            number += 1
            start += len(raw)
            self.line_at = ((ino, start), number)

    def start_offset(self, f, cursor):
        if cursor is None:
            return 0
        if not isinstance(cursor, str) or not cursor.isdigit():
            raise permanent("cursor is not a byte offset of this connector")
        offset = int(cursor)
        size = f.seek(0, os.SEEK_END)
        if offset > size:
            # The file was replaced by a shorter one: reading it again is safe (records are
            # states, not events) and better than missing changes.
            log("contacts file is shorter than the cursor: reading it from the start")
            return 0
        if offset > 0:
            f.seek(offset - 1)
            if f.read(1) != b"\n":
                log("cursor is not at a line start (file rewritten?): reading from the start")
                return 0
        return offset

    def changes(self, params):
        limit = params.get("limit", DEFAULT_LIMIT)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            limit = DEFAULT_LIMIT
        latest, invalid_no_id = {}, []
        with open(self.path, "rb") as f:
            offset = self.start_offset(f, params.get("cursor"))
            end, taken, has_more = offset, 0, False
            for number, _, line_end, raw in self.lines_from(f, offset):
                if taken == limit:
                    has_more = True
                    break
                rid, kind, value = self.parse(raw)
                end = line_end
                if kind == "blank":
                    continue
                taken += 1
                entry = (kind, value, number)
                if rid is None:
                    invalid_no_id.append(entry)
                    continue
                # Within a page only the latest line of an id counts: the page's lists carry
                # no order, so an earlier state of the same id would be ambiguous.
                latest[rid] = entry
        page = {"records": [], "invalid": [], "deleted": [], "next_cursor": str(end), "has_more": has_more}
        for kind, value, number in sorted(list(latest.values()) + invalid_no_id, key=lambda e: e[2]):
            if kind == "record":
                page["records"].append(value)
            elif kind == "deleted":
                page["deleted"].append(value)
            else:
                page["invalid"].append({"location": f"line {number}", "reason": value})
        log(f"changes: {len(page['records'])} records, {len(page['deleted'])} deleted, "
            f"{len(page['invalid'])} invalid, cursor {end}, more {has_more}")
        return page

    def latest_by_id(self):
        latest = {}
        with open(self.path, "rb") as f:
            for number, _, _, raw in self.lines_from(f, 0):
                rid, kind, value = self.parse(raw)
                if rid is not None:
                    latest[rid] = (kind, value, number)
        return latest

    def fetch(self, params):
        ref = params.get("record")
        if not isinstance(ref, dict) or not isinstance(ref.get("id"), str):
            raise invalid_input("fetch needs record {module, id}")
        if ref.get("module") != self.module:
            return {"record": None}  # not a module this CRM holds
        kind, value, number = self.latest_by_id().get(ref["id"], ("deleted", None, 0))
        if kind == "invalid":
            raise invalid_input(f"line {number}: {value}")
        return {"record": value if kind == "record" else None}

    def health(self, params):
        try:
            count = sum(1 for kind, _, _ in self.latest_by_id().values() if kind == "record")
        except OSError as e:
            return {"ok": False, "detail": f"cannot read the contacts file: {e.strerror}"}
        return {"ok": True, "detail": f"{count} records"}

    # Write-back.

    def load_written_keys(self):
        keys = set()
        try:
            with open(self.write_back_path, "rb") as f:
                for number, raw in enumerate(f, 1):
                    try:
                        keys.add(json.loads(raw)["key"])
                    except (ValueError, KeyError, TypeError):
                        # e.g. a line cut short by a crash: its key was never confirmed to
                        # the engine, which will send it again.
                        log(f"write-back file line {number} is unreadable; skipped")
        except FileNotFoundError:
            pass
        return keys

    def write_back(self, params):
        key = params.get("key")
        if not isinstance(key, str) or not key:
            raise permanent("write_back without a key")
        if key in self.written:
            # A re-send after a crash or timeout: the first write counted.
            log(f"write_back {key}: already written")
            return {}
        line = {"key": key}
        for name in ("records", "email", "list", "state", "opt_out", "at", "ledger_seq"):
            line[name] = params.get(name)
        line["written_at"] = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        data = (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")
        with open(self.write_back_path, "ab+") as f:
            # A crash may have left a line without its newline: start on a fresh line.
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    data = b"\n" + data
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # answered {} means durable: the engine will not re-send
        self.written.add(key)
        log(f"write_back {key}: {mask(params.get('email'))} {params.get('list')} -> {params.get('state')}")
        return {}

    # Webhook.

    def webhook(self, params):
        method = str(params.get("method", "")).upper()
        if method == "GET":
            return {"kind": "ignored"}  # e.g. a URL check by the sending system
        if method != "POST":
            raise invalid_input(f"method {method} not accepted")
        if not self.secret:
            raise invalid_input("webhooks are disabled: no webhook_secret setting")
        given = None
        for pair in params.get("headers") or []:
            if isinstance(pair, list) and len(pair) == 2 and str(pair[0]).lower() == "x-webhook-secret":
                given = str(pair[1])
        # Constant-time comparison: a timing difference must not reveal the secret.
        if given is None or not hmac.compare_digest(given.encode("utf-8"), self.secret.encode("utf-8")):
            log("webhook refused: missing or wrong secret")
            raise invalid_input("bad or missing x-webhook-secret")
        try:
            body = json.loads(params.get("body") or "")
        except json.JSONDecodeError:
            raise invalid_input("body is not JSON") from None
        ids = body.get("ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(
            (isinstance(i, str) and i) or (isinstance(i, int) and not isinstance(i, bool)) for i in ids
        ):
            raise invalid_input('body must be {"ids": ["..."]}')
        if not ids:
            return {"kind": "ignored"}
        return {"kind": "changed", "records": [{"module": self.module, "id": str(i)} for i in ids]}


if __name__ == "__main__":
    serve(FileCrm())
