"""A thin emulation of what moto does not model, in front of a moto server, for amidala's tests.

moto changes states at once; real EC2 does not. This proxy forwards every request to moto and
can, per its configuration:

- report new volumes as `creating`, and new snapshots as `pending`, for some seconds (or for
  ever, with a negative number) after they were made through it, if they were made while
  that delay was set;
- answer the first N calls of an action with EC2's throttling error (RequestLimitExceeded);
- answer every call of an action with a given error;
- answer each call of an action only after some seconds (EC2's own latency, stretched);
- count the calls of each action.

Control: POST /_proxy/config with a JSON object (keys: volume_creating_secs,
snapshot_pending_secs, throttle {Action: count}, fail {Action: {code, message, status}},
latency {Action: seconds}),
GET /_proxy/stats: {"calls": {Action: count}, "latency_secs": {Action: seconds of latency
injected so far}}. Listens on 127.0.0.1 only.

Usage: python ec2_proxy.py LISTEN_PORT UPSTREAM_URL
"""

import http.client
import http.server
import json
import sys
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET

lock = threading.Lock()
config = {"volume_creating_secs": 0, "snapshot_pending_secs": 0, "throttle": {}, "fail": {}, "latency": {}}
calls = {}
injected = {}  # action -> seconds of latency injected
created = {"volume": {}, "snapshot": {}}  # id -> time made


def delayed(kind, ident, secs):
    made = created[kind].get(ident)
    if made is None or secs == 0:
        return False
    return secs < 0 or time.monotonic() - made < secs


def local(tag):
    return tag.rsplit("}", 1)[-1]


def child(element, name):
    for c in element:
        if local(c.tag) == name:
            return c
    return None


# kind, the id element, the state it reports while delayed, the configured delay
DELAYS = {
    "volume": ("volumeId", "creating", "volume_creating_secs"),
    "snapshot": ("snapshotId", "pending", "snapshot_pending_secs"),
}


def hold_back(kind, element):
    """Reports `element` (a volume or snapshot) in its in-between state if it is delayed."""
    id_tag, state, key = DELAYS[kind]
    ident, status = child(element, id_tag), child(element, "status")
    if ident is None or status is None or not delayed(kind, ident.text, config[key]):
        return False
    status.text = state
    progress = child(element, "progress")
    if progress is not None:
        progress.text = "50%"
    return True


def rewrite(action, body):
    """Applies the configured delays to a successful response."""
    kinds = {"CreateVolume": "volume", "DescribeVolumes": "volume", "CreateSnapshot": "snapshot", "DescribeSnapshots": "snapshot"}
    kind = kinds.get(action)
    if kind is None:
        return body
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return body
    changed = False
    with lock:
        if action.startswith("Create"):
            ident = child(root, DELAYS[kind][0])
            # Only what is made while a delay is set is held back (a base imported before
            # the delays were configured is not).
            if ident is not None and config[DELAYS[kind][2]] != 0:
                created[kind][ident.text] = time.monotonic()
            changed = hold_back(kind, root)
        else:
            for item in root.iter():
                if local(item.tag) == "item" and hold_back(kind, item):
                    changed = True
    if not changed:
        return body
    if root.tag.startswith("{"):
        ET.register_namespace("", root.tag[1:].split("}")[0])
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def error_body(code, message):
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>%s</Code><Message>%s</Message>'
        "</Error></Errors><RequestID>amidala-test-proxy</RequestID></Response>" % (code, message)
    ).encode()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream = None

    def log_message(self, *args):
        pass

    def reply(self, status, body, content_type="text/xml"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/_proxy/stats":
            with lock:
                stats = {"calls": calls, "latency_secs": injected}
                return self.reply(200, json.dumps(stats).encode(), "application/json")
        self.forward(b"")

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path == "/_proxy/config":
            with lock:
                config.update(json.loads(body or b"{}"))
            return self.reply(200, b"{}", "application/json")
        self.forward(body)

    def forward(self, body):
        action = urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("Action", [""])[0]
        with lock:
            calls[action] = calls.get(action, 0) + 1
            throttle = config["throttle"].get(action, 0)
            if throttle > 0:
                config["throttle"][action] = throttle - 1
            fail = config["fail"].get(action)
            latency = config["latency"].get(action, 0)
            if latency > 0:
                injected[action] = injected.get(action, 0) + latency
        if latency > 0:
            time.sleep(latency)
        if throttle > 0:
            return self.reply(503, error_body("RequestLimitExceeded", "Request limit exceeded."))
        if fail:
            return self.reply(fail.get("status", 400), error_body(fail["code"], fail["message"]))
        url = urllib.parse.urlsplit(self.upstream)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        if response.status == 200:
            data = rewrite(action, data)
        self.send_response(response.status)
        for k, v in response.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the caller died waiting (the fault-injection tests kill it on purpose)
        conn.close()


def main():
    port, upstream = int(sys.argv[1]), sys.argv[2]
    Handler.upstream = upstream
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
