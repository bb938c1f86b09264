#!/usr/bin/env python3
"""Self-test of the example exec connectors: python3 examples/connectors/selftest.py

Starts file_crm.py and file_campaigns.py as optinsync would (own temp directory as working
directory, environment cleared but for PATH, settings only in `configure`), speaks protocol
version 1 to them and checks every method, the error paths, cursor resume, idempotency and
the crash/restart behaviour. Standard library only; exits non-zero on the first failure.
"""

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
CRM = os.path.join(HERE, "file_crm.py")
CAMPAIGNS = os.path.join(HERE, "file_campaigns.py")
TIMEOUT = 10  # seconds per answer
SECRET = "s3cret-webhook-value"


class Failure(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failure(message)


class Connector:
    """One connector process and the engine's side of the protocol."""

    def __init__(self, script, workdir):
        self.script = os.path.basename(script)
        self.proc = subprocess.Popen(
            [sys.executable, script],
            cwd=workdir,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines = queue.Queue()
        self.stderr = []
        self.next_id = 0
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # stdout closed: the process is gone

    def _read_stderr(self):
        for line in self.proc.stderr:
            self.stderr.append(line)

    def write(self, message):
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()

    def request(self, method, params=None):
        """Send one request; return the raw answer object (result or error)."""
        rid = self.next_id
        self.next_id += 1
        self.write({"id": rid, "method": method, "params": params if params is not None else {}})
        try:
            line = self.lines.get(timeout=TIMEOUT)
        except queue.Empty:
            raise Failure(f"{self.script}: no answer to {method} within {TIMEOUT}s") from None
        check(line is not None, f"{self.script}: stdout closed while waiting for {method}")
        check(line.endswith(b"\n"), f"{self.script}: answer line not newline-terminated")
        try:
            answer = json.loads(line)
        except ValueError:
            raise Failure(f"{self.script}: answer to {method} is not JSON: {line[:200]!r}") from None
        check(isinstance(answer, dict) and answer.get("id") == rid, f"{self.script}: answer id {answer.get('id')} for request {rid}")
        check(("result" in answer) != ("error" in answer), f"{self.script}: answer needs exactly one of result/error")
        if "error" in answer:
            check_error(answer["error"], f"{self.script} {method}")
        return answer

    def call(self, method, params=None):
        answer = self.request(method, params)
        check("result" in answer, f"{self.script}: {method} failed: {answer.get('error')}")
        return answer["result"]

    def fail(self, method, params=None):
        answer = self.request(method, params)
        check("error" in answer, f"{self.script}: {method} should fail, got {answer.get('result')}")
        return answer["error"]

    def start(self, settings, base_dir, state=None, versions=(1,), role=None):
        hello = self.call("hello", {"protocol_versions": list(versions), "engine": "selftest",
                                    "role": role, "name": role})
        check(hello["protocol_version"] == 1, f"hello picked {hello['protocol_version']}")
        check(role in hello["roles"], f"hello roles {hello['roles']}")
        configured = self.call("configure", {"settings": settings, "base_dir": base_dir, "state": state})
        check(isinstance(configured, dict), "configure result is not an object")
        return hello, configured

    def shutdown(self):
        check(self.call("shutdown") == {}, "shutdown answer is not {}")
        self.proc.stdin.close()
        code = self.proc.wait(timeout=5)
        check(code == 0, f"{self.script}: exit {code} after shutdown")

    def log(self):
        return b"".join(self.stderr).decode("utf-8", "replace")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def check_error(e, where):
    """The ERROR object is read strictly by the engine: exactly its fields, a known kind."""
    allowed = {
        "transient": {"kind", "message", "retry_after_ms", "scope"},
        "permanent": {"kind", "message"},
        "rejected": {"kind", "message"},
        "config": {"kind", "message", "setting"},
        "invalid_input": {"kind", "message"},
    }
    check(isinstance(e, dict) and e.get("kind") in allowed, f"{where}: unknown error {e}")
    check(set(e) <= allowed[e["kind"]] and isinstance(e.get("message"), str), f"{where}: bad error fields {e}")
    if e["kind"] == "config":
        check(isinstance(e.get("setting"), str), f"{where}: config error without setting")
    if e["kind"] == "transient":
        check(e.get("scope", "service") in ("service", "record"), f"{where}: bad scope {e}")


def write(path, text, mode="w"):
    with open(path, mode, encoding="utf-8") as f:
        f.write(text)


def jsonl(*objects):
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects)


# --- CRM ---


def test_crm(tmp):
    contacts = os.path.join(tmp, "crm.jsonl")
    write(contacts, jsonl(
        {"id": "17", "email": "ana@example.org", "language": "en", "opted_out": False,
         "lists": ["newsletter"], "fields": {"First_Name": "Ana"}, "modified_at": "2026-12-01T10:00:00Z"},
        "{this is not json",                                          # line 2
        {"email": "noid@example.org"},                                # line 3: no id
        {"id": "5", "email": "not-an-address"},                       # line 4: malformed email
        {"id": "9", "deleted": True},                                 # line 5
        {"id": "17", "email": "ana@example.org", "language": "es", "opted_out": True,
         "lists": [], "modified_at": "2026-12-02T10:00:00+01:00"},   # line 6: replaces line 1
    ))
    settings = {"path": "crm.jsonl", "write_back_path": "writeback.jsonl", "webhook_secret": SECRET}

    # Version negotiation and configuration errors.
    c = Connector(CRM, tmp)
    try:
        e = c.fail("hello", {"protocol_versions": [2], "role": "crm", "name": "crm"})
        check(e["kind"] == "config" and e["setting"] == "command", f"hello v2: {e}")
    finally:
        c.kill()
    c = Connector(CRM, tmp)
    try:
        c.call("hello", {"protocol_versions": [1], "role": "crm", "name": "crm"})
        e = c.fail("configure", {"settings": {"write_back_path": "x"}, "base_dir": tmp, "state": None})
        check(e["kind"] == "config" and e["setting"] == "path", f"missing path: {e}")
    finally:
        c.kill()

    c = Connector(CRM, tmp)
    try:
        hello, _ = c.start(settings, tmp, role="crm")
        check("webhook" in hello["capabilities"], f"capabilities {hello['capabilities']}")

        # Paging: limit 2 → two lines per page, has_more while lines remain.
        page = c.call("changes", {"cursor": None, "limit": 2})
        check([r["record"]["id"] for r in page["records"]] == ["17"], f"page 1 records {page['records']}")
        check(page["invalid"] == [{"location": "line 2", "reason": "not valid JSON"}], f"page 1 invalid {page['invalid']}")
        check(page["has_more"] is True and page["next_cursor"], "page 1 has_more")
        first_cursor = page["next_cursor"]
        page = c.call("changes", {"cursor": first_cursor, "limit": 2})
        check(page["records"] == [] and [i["location"] for i in page["invalid"]] == ["line 3", "line 4"],
              f"page 2 {page}")
        check(all("not-an-address" not in i["reason"] for i in page["invalid"]), "invalid reason echoes the address")
        check(page["has_more"] is True, "page 2 has_more")
        page = c.call("changes", {"cursor": page["next_cursor"], "limit": 2})
        check(page["deleted"] == [{"module": "Contacts", "id": "9"}], f"page 3 deleted {page['deleted']}")
        latest = page["records"][0]
        check(latest["language"] == "es" and latest["opted_out"] is True and latest["asserted_lists"] == []
              and latest["modified_at"] == "2026-12-02T09:00:00Z" and latest["fields"] == {},
              f"page 3 record {latest}")
        check(page["has_more"] is False, "page 3 has_more")
        end_cursor = page["next_cursor"]
        empty = c.call("changes", {"cursor": end_cursor, "limit": 100})
        check(empty["records"] == [] and empty["invalid"] == [] and empty["deleted"] == []
              and empty["next_cursor"] == end_cursor and empty["has_more"] is False, f"at end {empty}")

        # fetch: latest version, deleted → null, unknown → null.
        r = c.call("fetch", {"record": {"module": "Contacts", "id": "17"}})["record"]
        check(r["language"] == "es", f"fetch 17 {r}")
        check(c.call("fetch", {"record": {"module": "Contacts", "id": "9"}})["record"] is None, "fetch deleted")
        check(c.call("fetch", {"record": {"module": "Contacts", "id": "404"}})["record"] is None, "fetch unknown")
        check(c.fail("fetch", {"record": {"module": "Contacts", "id": "5"}})["kind"] == "invalid_input", "fetch malformed")

        check(c.call("health") == {"ok": True, "detail": "1 records"}, "health")

        # write_back: idempotent by key.
        wb = {"key": "wb-1", "records": [{"module": "Contacts", "id": "17"}], "email": "ana@example.org",
              "list": "newsletter", "state": "confirmed", "opt_out": False, "at": "2026-12-01T10:00:00Z",
              "ledger_seq": 42}
        check(c.call("write_back", wb) == {}, "write_back")
        check(c.call("write_back", wb) == {}, "write_back again")
        with open(os.path.join(tmp, "writeback.jsonl"), encoding="utf-8") as f:
            written = [json.loads(line) for line in f]
        check(len(written) == 1 and written[0]["key"] == "wb-1" and written[0]["ledger_seq"] == 42,
              f"write-back file {written}")

        # webhook: GET ignored, good POST changed, forged/other → invalid_input.
        def hook(method, secret, body):
            headers = [["content-type", "application/json"]] + ([["x-webhook-secret", secret]] if secret else [])
            return {"method": method, "path": "/webhooks/crm", "query": "", "headers": headers,
                    "body": body, "peer": None}
        check(c.call("webhook", hook("GET", None, "")) == {"kind": "ignored"}, "webhook GET")
        ev = c.call("webhook", hook("POST", SECRET, json.dumps({"ids": ["17", 9]})))
        check(ev == {"kind": "changed", "records": [{"module": "Contacts", "id": "17"},
                                                    {"module": "Contacts", "id": "9"}]}, f"webhook POST {ev}")
        for forged in (hook("POST", "wrong", '{"ids":["17"]}'), hook("POST", None, '{"ids":["17"]}'),
                       hook("POST", SECRET, "not json"), hook("PUT", SECRET, '{"ids":["17"]}')):
            check(c.fail("webhook", forged)["kind"] == "invalid_input", f"forged webhook accepted: {forged}")

        # Unknown method, cancel (no answer), then the connector still serves.
        e = c.fail("no_such_method")
        check(e["kind"] == "permanent" and "unknown method" in e["message"], f"unknown method {e}")
        c.write({"method": "cancel", "params": {"id": 3}})
        check(c.call("health")["ok"] is True, "health after cancel")

        # A line still being written (no newline yet) is left for later, then picked up.
        write(contacts, json.dumps({"id": "21", "email": "ben@example.org"}), "a")
        page = c.call("changes", {"cursor": end_cursor, "limit": 10})
        check(page["records"] == [] and page["next_cursor"] == end_cursor, f"partial line consumed {page}")
        write(contacts, "\n", "a")
        page = c.call("changes", {"cursor": end_cursor, "limit": 10})
        check([r["record"]["id"] for r in page["records"]] == ["21"], f"completed line {page}")
        new_end = page["next_cursor"]
        c.shutdown()
        log = c.log()
        check(SECRET not in log and "ana@example.org" not in log, "settings or an address in the log")
    finally:
        c.kill()

    # Cursor resume in a new process; write-back keys survive the restart.
    write(contacts, jsonl({"id": "22", "email": "cy@example.org", "deleted": False}), "a")
    c = Connector(CRM, tmp)
    try:
        c.start(settings, tmp, role="crm")
        page = c.call("changes", {"cursor": new_end, "limit": 10})
        check([r["record"]["id"] for r in page["records"]] == ["22"], f"resume {page}")
        again = c.call("changes", {"cursor": first_cursor, "limit": 1})
        check(again["invalid"] == [{"location": "line 3", "reason": "no id"}], f"resume mid-file {again}")
        check(c.call("write_back", {"key": "wb-1", "email": "ana@example.org"}) == {}, "write_back after restart")
        with open(os.path.join(tmp, "writeback.jsonl"), encoding="utf-8") as f:
            check(len(f.readlines()) == 1, "write_back duplicated after restart")
        # End of input without shutdown: exit 0.
        c.proc.stdin.close()
        check(c.proc.wait(timeout=5) == 0, "exit code at end of input")
    finally:
        c.kill()


# --- campaigns ---


def members(tmp, name="L1"):
    with open(os.path.join(tmp, "lists.json"), encoding="utf-8") as f:
        return json.load(f)["lists"].get(name, {})


def sub_item(key, email):
    return {"key": key, "subscriber": {"email": email, "language": "en", "fields": {"First_Name": "X"}}}


def test_campaigns(tmp):
    base = {"path": "lists.json", "events_path": "events.jsonl", "lists": ["L1"], "max_batch": 10}

    c = Connector(CAMPAIGNS, tmp)
    try:
        c.call("hello", {"protocol_versions": [1], "role": "campaigns", "name": "campaigns"})
        e = c.fail("configure", {"settings": {"path": "lists.json"}, "base_dir": tmp, "state": None})
        check(e["kind"] == "config" and e["setting"] == "events_path", f"missing events_path {e}")
    finally:
        c.kill()

    c = Connector(CAMPAIGNS, tmp)
    try:
        hello, configured = c.start(base, tmp, role="campaigns")
        check({"list_members", "state"} <= set(hello["capabilities"]), f"capabilities {hello}")
        check(configured == {"max_batch": 10}, f"configure result {configured}")

        # Partial success: the bad address fails alone.
        batch = [sub_item("k1", "ana@example.org"), sub_item("k2", "no-at-sign"), sub_item("k3", "ben@example.org")]
        res = c.call("subscribe", {"list": "L1", "items": batch})["results"]
        check(len(res) == 3 and res[0] == {"ok": True} and res[2] == {"ok": True}, f"subscribe {res}")
        check(res[1]["error"]["kind"] == "permanent", f"bad address {res[1]}")
        check(sorted(members(tmp)) == ["ana@example.org", "ben@example.org"], f"members {members(tmp)}")

        # Idempotent: the same batch again changes nothing and succeeds.
        since = members(tmp)["ana@example.org"]["since"]
        res = c.call("subscribe", {"list": "L1", "items": batch})["results"]
        check([r.get("ok") for r in res] == [True, None, True], f"subscribe again {res}")
        check(sorted(members(tmp)) == ["ana@example.org", "ben@example.org"]
              and members(tmp)["ana@example.org"]["since"] == since, "subscribe again changed members")

        # Unknown list: per-item permanent "no such list".
        res = c.call("subscribe", {"list": "L2", "items": [sub_item("k4", "ana@example.org")]})["results"]
        check(res == [{"error": {"kind": "permanent", "message": "no such list"}}], f"L2 {res}")

        # Remove: absent → ok, present → gone.
        res = c.call("remove", {"list": "L1", "items": [{"key": "r1", "email": "zed@example.org"},
                                                        {"key": "r2", "email": "ben@example.org"}]})["results"]
        check(res == [{"ok": True}, {"ok": True}], f"remove {res}")
        check(list(members(tmp)) == ["ana@example.org"], f"after remove {members(tmp)}")

        # list_members
        page = c.call("list_members", {"list": "L1", "cursor": None})
        check([m["email"] for m in page["members"]] == ["ana@example.org"] and page["has_more"] is False,
              f"list_members {page}")

        # status_events: only this list's events, cursor resumes, bad lines skipped.
        write(os.path.join(tmp, "events.jsonl"), jsonl(
            {"list": "L1", "email": "ana@example.org", "kind": "opened", "at": "2026-12-01T10:00:00Z"},
            {"list": "L2", "email": "ana@example.org", "kind": "clicked", "at": "2026-12-01T10:00:00Z"},
            {"list": "L1", "email": "ana@example.org", "kind": "exploded", "at": "2026-12-01T10:00:00Z"},
            "garbage",
        ))
        page = c.call("status_events", {"list": "L1", "cursor": None})
        check([e["kind"] for e in page["events"]] == ["opened"] and page["has_more"] is False, f"events {page}")
        check(page["events"][0] == {"email": "ana@example.org", "kind": "opened",
                                    "at": "2026-12-01T10:00:00Z", "detail": None}, f"event {page['events'][0]}")
        events_cursor = page["next_cursor"]
        check(c.fail("status_events", {"list": "L2", "cursor": None})["kind"] == "permanent", "events of unknown list")

        check(c.fail("no_such_method")["kind"] == "permanent", "unknown method")
        health = c.call("health")
        check(health["ok"] is True and "1 members" in health["detail"], f"health {health}")
        state = c.call("export_state")["state"]
        check(json.loads(state)["write_calls"] == 4, f"state {state}")
        c.shutdown()
        check("ana@example.org" not in c.log(), "full address in the log")
    finally:
        c.kill()

    # Restart with the exported state: the counter continues; events resume at the cursor.
    write(os.path.join(tmp, "events.jsonl"),
          jsonl({"list": "L1", "email": "ana@example.org", "kind": "unsubscribed", "at": "2026-12-03T10:00:00Z"}), "a")
    c = Connector(CAMPAIGNS, tmp)
    try:
        c.start(base, tmp, state=state, role="campaigns")
        page = c.call("status_events", {"list": "L1", "cursor": events_cursor})
        check([e["kind"] for e in page["events"]] == ["unsubscribed"], f"events resume {page}")
        c.call("remove", {"list": "L1", "items": []})
        check(json.loads(c.call("export_state")["state"])["write_calls"] == 5, "state not carried over")
        c.shutdown()
    finally:
        c.kill()
    c = Connector(CAMPAIGNS, tmp)
    try:
        c.start(base, tmp, state="not json", role="campaigns")  # unreadable state: fresh start
        check(json.loads(c.call("export_state")["state"])["write_calls"] == 0, "bad state not ignored")
        c.shutdown()
        check("unreadable saved state" in c.log(), "bad state not logged")
    finally:
        c.kill()

    # fail_first_calls: transient (service) with retry_after_ms 100, then success.
    c = Connector(CAMPAIGNS, tmp)
    try:
        c.start({**base, "fail_first_calls": 2}, tmp, role="campaigns")
        for attempt in (1, 2):
            e = c.fail("subscribe", {"list": "L1", "items": [sub_item("k9", "cy@example.org")]})
            check(e == {"kind": "transient", "message": e["message"], "scope": "service", "retry_after_ms": 100},
                  f"attempt {attempt}: {e}")
        res = c.call("subscribe", {"list": "L1", "items": [sub_item("k9", "cy@example.org")]})["results"]
        check(res == [{"ok": True}], f"after outage {res}")
        c.shutdown()
    finally:
        c.kill()


def test_crash(tmp):
    """crash_after_items: exit mid-batch; the re-sent batch (same keys) applies each once."""
    settings = {"path": "lists.json", "events_path": "events.jsonl", "crash_after_items": 2}
    batch = [sub_item(f"outbox-{i}", f"p{i}@example.org") for i in range(5)]
    c = Connector(CAMPAIGNS, tmp)
    try:
        c.start(settings, tmp, role="campaigns")
        c.write({"id": 99, "method": "subscribe", "params": {"list": "L1", "items": batch}})
        code = c.proc.wait(timeout=TIMEOUT)
        check(code == 3, f"crash exit code {code}")
        check(c.lines.get(timeout=TIMEOUT) is None, "an answer was sent before the crash")
    finally:
        c.kill()
    check(sorted(members(tmp)) == ["p0@example.org", "p1@example.org"], f"after crash {sorted(members(tmp))}")

    c = Connector(CAMPAIGNS, tmp)  # the engine's restart: same settings, same keys
    try:
        c.start(settings, tmp, role="campaigns")
        res = c.call("subscribe", {"list": "L1", "items": batch})["results"]
        check(res == [{"ok": True}] * 5, f"re-sent batch {res}")
        got = members(tmp)
        check(sorted(got) == [f"p{i}@example.org" for i in range(5)], f"after re-send {sorted(got)}")
        check([got[f"p{i}@example.org"]["key"] for i in range(5)] == [f"outbox-{i}" for i in range(5)], "keys")
        c.shutdown()
    finally:
        c.kill()
    with open(os.path.join(tmp, "lists.json"), encoding="utf-8") as f:
        text = f.read()
    check(text.count('"p0@example.org"') == 1, "p0 stored twice")


def main():
    tests = [("crm", test_crm), ("campaigns", test_campaigns), ("crash and restart", test_crash)]
    failed = 0
    for name, test in tests:
        with tempfile.TemporaryDirectory(prefix="optinsync-selftest-") as tmp:
            try:
                test(tmp)
                print(f"ok    {name}")
            except Failure as e:
                failed += 1
                print(f"FAIL  {name}: {e}")
            except Exception:
                failed += 1
                print(f"FAIL  {name}: {traceback.format_exc()}")
    print("all passed" if not failed else f"{failed} of {len(tests)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
