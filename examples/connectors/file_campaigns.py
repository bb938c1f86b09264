#!/usr/bin/env python3
"""Example optinsync exec connector, role `campaigns`: lists kept in a JSON file.

Speaks optinsync connector protocol version 1 (docs/connector-protocol.md) on stdin/stdout.
Python 3.11+, standard library only, one self-contained file: copy it and adapt.

Settings (the `[connectors.campaigns.settings]` table, received in `configure`):
  path               JSON file of the lists' members, rewritten atomically after each change:
                     {"lists": {"L1": {"ana@example.org": {"status": "subscribed",
                                       "language": "en", "fields": {}}}}}
  events_path        JSONL file of status events appended by the tool (or a test):
                     {"list": "L1", "email": "...", "kind": "unsubscribed", "at": "...Z"}
  max_batch          largest subscribe/remove batch (default 50)
  lists              optional: the list ids that exist; others are "no such list"
  fail_first_calls   test hook: the first N subscribe/remove calls fail transiently (default 0)
  crash_after_items  test hook: exit abruptly mid-batch once that many items were applied
                     since start (default 0 = never); fires once per lists file (see below)
Relative paths are resolved against `base_dir` (the directory of optinsync's config file).

The lists file is the membership; the events file is what happened inside the tool. They
are independent on purpose: `status_events` only reports, it never edits membership.
"""

import json
import os
import sys
import tempfile
import traceback
from datetime import datetime, timezone

PROTOCOL_VERSION = 1
CONNECTOR = "example-file-campaigns 1.0"
ROLES = ["campaigns"]
CAPABILITIES = ["list_members", "state"]
DEFAULT_MAX_BATCH = 50
MAX_LINE = 16 * 1024 * 1024  # the protocol's line limit
PAGE = 500  # status events / members per page
STATUS_KINDS = {"unsubscribed", "bounced", "complained", "opened", "clicked", "confirmed"}


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
    sys.stderr.write(f"file_campaigns: {message}\n")
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
        # The `max_batch` setting is not known yet (settings come with `configure`): the
        # default here, the configured value in the answer to `configure`.
        "max_batch": DEFAULT_MAX_BATCH,
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
    if "T" not in value or t.tzinfo is None:
        return None
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def now():
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# --- the campaigns tool ---


class FileCampaigns:
    METHODS = {"configure", "health", "export_state", "subscribe", "remove", "status_events", "list_members"}

    def configure(self, settings, base_dir, state):
        def text(name, required):
            value = settings.get(name)
            if value is None and not required:
                return None
            if not isinstance(value, str) or not value:
                raise config_error(name, "missing" if value is None else "must be a non-empty string")
            return value

        def count(name, default, least):
            value = settings.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise config_error(name, f"must be a whole number of at least {least}")
            return value

        self.path = resolve(base_dir, text("path", True))
        if not os.path.isdir(os.path.dirname(self.path) or "."):
            raise config_error("path", "its directory does not exist")
        self.events_path = resolve(base_dir, text("events_path", True))
        self.max_batch = count("max_batch", DEFAULT_MAX_BATCH, 1)
        allowed = settings.get("lists")
        if allowed is not None and not (
            isinstance(allowed, list) and all(isinstance(x, str) and x for x in allowed)
        ):
            raise config_error("lists", "must be a list of list ids")
        self.allowed = set(allowed) if allowed is not None else None
        self.fail_first_calls = count("fail_first_calls", 0, 0)
        self.crash_after_items = count("crash_after_items", 0, 0)
        try:
            self.load()  # a broken lists file is found now, not at the first subscribe
        except ConnectorError as e:
            raise config_error("path", e.body["message"]) from None

        # Per-process counters for the test hooks ("the first N calls since start").
        self.write_calls_here = 0
        self.applied_here = 0
        # Kept across restarts through export_state → configure.state. A real connector
        # keeps here what a restart must not forget and the vendor cannot tell it again,
        # e.g. API quota used in the current window or a lock-out's end. This example keeps
        # a call counter, which is enough to see the mechanism work end to end.
        self.total_write_calls = 0
        if state is not None:
            try:
                saved = json.loads(state)
                if saved.get("version") != 1 or not isinstance(saved.get("write_calls"), int):
                    raise ValueError("unknown layout")
                self.total_write_calls = saved["write_calls"]
            except (ValueError, AttributeError, TypeError) as e:
                # State is an optimisation: unreadable state means starting fresh, not
                # refusing to start.
                log(f"ignored unreadable saved state ({e})")
        log(f"configured: max_batch {self.max_batch}, {self.total_write_calls} write calls so far")
        # Limits that depend on settings are known only now (addition to protocol v1).
        return {"max_batch": self.max_batch}

    def export_state(self, params):
        return {"state": json.dumps({"version": 1, "write_calls": self.total_write_calls})}

    # The lists file.

    def load(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {"lists": {}}
        except (ValueError, UnicodeDecodeError):
            # Transient: an operator can repair the file, and the engine's retries then
            # carry on without anyone having to replay dead letters.
            raise transient("lists file is not valid JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("lists"), dict):
            raise transient('lists file is not {"lists": {...}}')
        return data

    def save(self, data):
        # Temp file + fsync + rename: a crash leaves the old file or the new one, never half.
        directory = os.path.dirname(self.path) or "."
        fd, tmp = tempfile.mkstemp(prefix=".lists-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    def check_list(self, name):
        if not isinstance(name, str) or not name:
            raise invalid_input("missing list")
        if self.allowed is not None and name not in self.allowed:
            return "no such list"
        return None

    # Writes.

    def begin_write(self, method, items):
        if not isinstance(items, list):
            raise invalid_input(f"{method} needs items")
        self.total_write_calls += 1
        if self.write_calls_here < self.fail_first_calls:
            self.write_calls_here += 1
            log(f"{method}: simulated outage ({self.write_calls_here} of {self.fail_first_calls})")
            raise transient("simulated outage (fail_first_calls)", retry_after_ms=100)
        self.write_calls_here += 1
        if len(items) > self.max_batch:
            # The engine should not do this; serving the batch beats failing it.
            log(f"{method}: {len(items)} items, more than max_batch {self.max_batch}")

    def applied(self, data):
        """Count one applied item; the crash hook fires here, mid-batch."""
        self.applied_here += 1
        if self.crash_after_items and self.applied_here >= self.crash_after_items:
            marker = self.path + ".crashed"
            if not os.path.exists(marker):
                # What was applied so far is saved, the rest of the batch is not, and no
                # answer is sent: the engine must re-send the batch with the same keys.
                # The marker makes the hook fire once per lists file, so the restarted
                # process (same settings) gets through the re-sent batch.
                self.save(data)
                with open(marker, "w") as f:
                    f.write(f"{now()} after {self.applied_here} items\n")
                log(f"crash_after_items: exiting after {self.applied_here} items")
                sys.stderr.flush()
                os._exit(3)

    def subscribe(self, params):
        items = params.get("items")
        self.begin_write("subscribe", items)
        list_problem = self.check_list(params.get("list"))
        data = self.load()
        members = data["lists"].setdefault(params["list"], {}) if list_problem is None else {}
        results, changed = [], False
        for item in items:
            item = item if isinstance(item, dict) else {}
            sub = item.get("subscriber") if isinstance(item.get("subscriber"), dict) else {}
            email = sub.get("email")
            if list_problem:
                results.append({"error": permanent(list_problem).body})
                continue
            if not isinstance(item.get("key"), str) or not isinstance(email, str):
                results.append({"error": permanent("item needs key and subscriber.email").body})
                continue
            if "@" not in email:
                results.append({"error": permanent("not an email address").body})
                continue
            fields = sub.get("fields") if isinstance(sub.get("fields"), dict) else {}
            old = members.get(email)
            # Keyed by address: subscribing a member again updates it, never duplicates it.
            members[email] = {
                "status": "subscribed",
                "language": sub.get("language"),
                "fields": fields,
                "key": item["key"],
                "since": old["since"] if old and old.get("status") == "subscribed" and "since" in old else now(),
            }
            changed = True
            log(f"subscribe {params['list']}: {mask(email)} ({'again' if old else 'new'})")
            self.applied(data)
            results.append({"ok": True})
        if changed:
            self.save(data)
        return {"results": results}

    def remove(self, params):
        items = params.get("items")
        self.begin_write("remove", items)
        # A removal from a list that does not exist is refused rather than reported done:
        # a wrong list id must not make a withdrawal look carried out.
        list_problem = self.check_list(params.get("list"))
        data = self.load()
        members = data["lists"].get(params["list"], {})
        results, changed = [], False
        for item in items:
            item = item if isinstance(item, dict) else {}
            email = item.get("email")
            if list_problem:
                results.append({"error": permanent(list_problem).body})
            elif not isinstance(item.get("key"), str) or not isinstance(email, str):
                results.append({"error": permanent("item needs key and email").body})
            elif "@" not in email:
                results.append({"error": permanent("not an email address").body})
            else:
                if members.pop(email, None) is not None:
                    changed = True
                    log(f"remove {params['list']}: {mask(email)}")
                results.append({"ok": True})  # not on the list is the wanted outcome too
        if changed:
            self.save(data)
        return {"results": results}

    # Reads.

    def status_events(self, params):
        name = params.get("list")
        problem = self.check_list(name)
        if problem:
            raise permanent(problem)
        cursor = params.get("cursor")
        if cursor is not None and not (isinstance(cursor, str) and cursor.isdigit()):
            raise permanent("cursor is not a byte offset of this connector")
        offset = int(cursor or 0)
        events, has_more = [], False
        try:
            f = open(self.events_path, "rb")
        except FileNotFoundError:
            return {"events": [], "next_cursor": str(offset), "has_more": False}
        with f:
            size = f.seek(0, os.SEEK_END)
            if offset > size:
                # The file was replaced by a shorter one; the engine tolerates an event seen twice
                # far better than one never seen.
                log("events file is shorter than the cursor: reading it from the start")
                offset = 0
            if offset > 0:
                f.seek(offset - 1)
                if f.read(1) != b"\n":
                    log("cursor is not at a line start (file rewritten?): reading from the start")
                    offset = 0
            f.seek(0)
            number = 1 + f.read(offset).count(b"\n")  # for `line N` in the log
            while True:
                start = f.tell()
                raw = f.readline()
                if not raw.endswith(b"\n"):  # none left, or a line still being written
                    f.seek(start)
                    break
                if len(events) == PAGE:
                    has_more = True
                    f.seek(start)
                    break
                event = self.parse_event(number, raw, name)
                if event is not None:
                    events.append(event)
                number += 1
            offset = f.tell()
        if events:
            log(f"status_events {name}: {len(events)} events, cursor {offset}")
        return {"events": events, "next_cursor": str(offset), "has_more": has_more}

    def parse_event(self, number, raw, name):
        if not raw.strip():
            return None
        try:
            e = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            e = None
        if not isinstance(e, dict):
            log(f"events file line {number}: not a JSON object; skipped")
            return None
        if e.get("list") != name:
            return None
        at = rfc3339(e.get("at"))
        email = e.get("email")
        detail = e.get("detail")
        if not isinstance(email, str) or "@" not in email or e.get("kind") not in STATUS_KINDS or at is None \
                or not isinstance(detail, (str, type(None))):
            # There is no `invalid` list in a status page: the operator learns from the log.
            log(f"events file line {number}: not a status event (email, kind, at, detail); skipped")
            return None
        return {"email": email, "kind": e["kind"], "at": at, "detail": detail}

    def list_members(self, params):
        name = params.get("list")
        problem = self.check_list(name)
        if problem:
            raise permanent(problem)
        cursor = params.get("cursor")
        if cursor is not None and not isinstance(cursor, str):
            raise permanent("cursor is not an address of this connector")
        members = self.load()["lists"].get(name, {})
        # Cursor = the last address handed out: stable even if members change between pages.
        emails = sorted(e for e, m in members.items() if m.get("status") == "subscribed" and (cursor is None or e > cursor))
        page = emails[:PAGE]
        return {
            "members": [
                {"email": e, "language": members[e].get("language"), "fields": members[e].get("fields") or {}}
                for e in page
            ],
            "next_cursor": page[-1] if page else cursor,
            "has_more": len(emails) > PAGE,
        }

    def health(self, params):
        try:
            data = self.load()
        except ConnectorError as e:
            return {"ok": False, "detail": e.body["message"]}
        count = sum(1 for m in data["lists"].values() for x in m.values() if x.get("status") == "subscribed")
        return {"ok": True, "detail": f"{len(data['lists'])} lists, {count} members, "
                                      f"{self.total_write_calls} write calls"}


if __name__ == "__main__":
    serve(FileCampaigns())
