"""A thin emulation of what moto does not model, in front of a moto server, for amidala's tests.

moto changes states at once; real EC2 does not. This proxy forwards every request to moto and
can, per its configuration:

- report new volumes as `creating`, and new snapshots as `pending`, for some seconds (or for
  ever, with a negative number) after they were made through it, if they were made while
  that delay was set;
- answer the first N calls of an action with EC2's throttling error (RequestLimitExceeded);
- answer every call of an action with a given error (or every one after the first N);
- answer each call of an action only after some seconds (EC2's own latency, stretched);
- lose the answers of the first N calls of an action (the call reaches moto, the caller gets
  EC2's InternalError and retries);
- answer NotFound (InvalidVolume.NotFound, InvalidSnapshot.NotFound, InvalidAMIID.NotFound) for
  some seconds (or for ever, with a negative number) after a volume, snapshot or image was
  made through it (CreateVolume, CreateSnapshot, RegisterImage, CopyImage), to every Describe*,
  CreateTags, DeleteTags, Delete* and DeregisterImage call that names its id: EC2's eventual
  consistency. Per kind (not_found_secs {"volume": s, "snapshot": s, "image": s}), as it was
  set when the resource was made;
- count the calls of each action, and record their order.

And tags on creation where moto ignores them: RegisterImage's and CopyImage's TagSpecifications
(resource type image) are applied to the new image, as EC2 does.

And for instances (boot tests), what moto does not model:

- RunInstances is idempotent by ClientToken as on EC2 (a repeated token answers the first
  answer again, starting nothing), which moto ignores;
- instances launched through the proxy are `pending` for instance_pending_secs, their status
  checks `initializing` for instance_status_initializing_secs after the launch (moto: `running`
  and `ok` at once; while `pending`, DescribeInstanceStatus lists nothing of them, as EC2);
  terminated ones are `shutting-down` for instance_shutting_down_secs (moto: `terminated` at
  once); each delay as it was set when the instance was launched or terminated;
- RegisterImage refuses a name an image registered through the proxy and not deregistered
  has (EC2's InvalidAMIName.Duplicate: names are unique among an account's images in a
  region), which moto accepts;
- DescribeImages reports the boot mode and architecture RegisterImage was given (moto ignores
  both and reports every image as `uefi`, where EC2 reports no boot mode unless one was given);
- GetConsoleOutput answers, base64-encoded, console_output (a text, or {ImageId: text} with
  "*" for any other image) instead of moto's fixed Xen boot log; with console_reveal_secs,
  the text's lines appear bit by bit over that many seconds after the launch, as a booting
  machine's do.

Control: POST /_proxy/config with a JSON object (keys: volume_creating_secs,
snapshot_pending_secs, not_found_secs {kind: seconds}, throttle {Action: count}, fail {Action: {code, message, status, after}},
latency {Action: seconds}, lose {Action: count}, instance_pending_secs,
instance_status_initializing_secs, instance_shutting_down_secs, console_output,
console_reveal_secs),
GET /_proxy/stats: {"calls": {Action: count}, "latency_secs": {Action: seconds of latency
injected so far}, "order": [Action, ...]}. Listens on 127.0.0.1 only.

Usage: python ec2_proxy.py LISTEN_PORT UPSTREAM_URL
"""

import base64
import http.client
import http.server
import json
import sys
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET

lock = threading.Lock()
config = {
    "volume_creating_secs": 0,
    "snapshot_pending_secs": 0,
    "not_found_secs": {},
    "throttle": {},
    "fail": {},
    "latency": {},
    "lose": {},
    "instance_pending_secs": 0,
    "instance_status_initializing_secs": 0,
    "instance_shutting_down_secs": 0,
    "console_output": None,
    "console_reveal_secs": 0,
}
calls = {}
order = []  # actions, in the order they came
injected = {}  # action -> seconds of latency injected
created = {"volume": {}, "snapshot": {}}  # id -> time made
launched = {}  # instance id -> {"at", "image", "pending", "initializing"}
terminated = {}  # instance id -> (time, shutting-down seconds)
tokens = {}  # RunInstances ClientToken -> its first answer
registered = {}  # image id -> {"bootMode": ..., "architecture": ...} as RegisterImage was given
names = {}  # image id -> the name RegisterImage gave it, while it is registered
unknown_until = {}  # id -> monotonic time until which calls naming it answer NotFound (None: ever)

# kind of resource: its id prefix, the element of its create answer, EC2's NotFound code and text
KINDS = {
    "volume": ("vol-", "volumeId", "InvalidVolume.NotFound", "The volume '%s' does not exist."),
    "snapshot": ("snap-", "snapshotId", "InvalidSnapshot.NotFound", "The snapshot '%s' does not exist."),
    "image": ("ami-", "imageId", "InvalidAMIID.NotFound", "The image id '[%s]' does not exist"),
}
MAKES = {"CreateVolume": "volume", "CreateSnapshot": "snapshot", "RegisterImage": "image", "CopyImage": "image"}
# the parameters that name a volume, snapshot or image in the calls NotFound applies to
ID_PARAMS = ("VolumeId", "SnapshotId", "ImageId", "ResourceId")


def not_yet_known(action, params):
    """The NotFound error (code, message) a call naming a just made id answers, or None."""
    if not (action.startswith(("Describe", "Delete")) or action in ("CreateTags", "DeregisterImage")):
        return None
    now = time.monotonic()
    for key, values in params.items():
        if key.split(".")[0] not in ID_PARAMS:
            continue
        for ident in values:
            if ident not in unknown_until:
                continue
            until = unknown_until[ident]
            if until is not None and now >= until:
                del unknown_until[ident]
                continue
            for prefix, _, code, message in KINDS.values():
                if ident.startswith(prefix):
                    return code, message % ident
    return None


def note_made(action, body):
    """Starts the NotFound window of what a create call made, if one is set for its kind."""
    kind = MAKES.get(action)
    secs = config["not_found_secs"].get(kind, 0) if kind else 0
    if secs == 0:
        return None
    try:
        ident = child(ET.fromstring(body), KINDS[kind][1])
    except ET.ParseError:
        return None
    if ident is None:
        return None
    with lock:
        unknown_until[ident.text] = None if secs < 0 else time.monotonic() + secs
    return ident.text


def image_tags(params):
    """The tags RegisterImage's or CopyImage's TagSpecifications give the image: [(key, value)]."""
    tags = []
    n = 1
    while "TagSpecification.%d.ResourceType" % n in params:
        if params["TagSpecification.%d.ResourceType" % n][0] == "image":
            m = 1
            while "TagSpecification.%d.Tag.%d.Key" % (n, m) in params:
                key = params["TagSpecification.%d.Tag.%d.Key" % (n, m)][0]
                value = params.get("TagSpecification.%d.Tag.%d.Value" % (n, m), [""])[0]
                tags.append((key, value))
                m += 1
        n += 1
    return tags


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


def find(element, name):
    """The first descendant of `element` named `name`."""
    for c in element.iter():
        if local(c.tag) == name:
            return c
    return None


def instance_items(root):
    """The items of a response that describe an instance: (item, instance id)."""
    for item in root.iter():
        if local(item.tag) == "item":
            ident = child(item, "instanceId")
            if ident is not None:
                yield item, ident.text


def set_state(item, code, name):
    state = child(item, "instanceState")
    if state is not None:
        child(state, "code").text = str(code)
        child(state, "name").text = name


def instance_delay(ident):
    """What an instance reports now: 'pending', 'initializing', 'shutting-down' or None."""
    now = time.monotonic()
    gone = terminated.get(ident)
    if gone is not None:
        return "shutting-down" if now - gone[0] < gone[1] else None
    made = launched.get(ident)
    if made is None:
        return None
    if now - made["at"] < made["pending"]:
        return "pending"
    if now - made["at"] < made["pending"] + made["initializing"]:
        return "initializing"
    return None


def console_text(ident):
    """The console output configured for the instance, as far as it has come."""
    text = config["console_output"]
    made = launched.get(ident, {})
    if isinstance(text, dict):
        text = text.get(made.get("image"), text.get("*"))
    if text is None:
        return None
    reveal = config["console_reveal_secs"]
    if reveal > 0 and "at" in made:
        lines = text.splitlines(keepends=True)
        shown = int(len(lines) * min(1.0, (time.monotonic() - made["at"]) / reveal))
        text = "".join(lines[:shown])
    return text


def rewrite_images(action, root, params):
    """What RegisterImage was given, as DescribeImages reports it; returns whether it changed."""
    if action == "RegisterImage":
        ident = child(root, "imageId")
        if ident is not None:
            registered[ident.text] = {
                "bootMode": params.get("BootMode", [None])[0],
                "architecture": params.get("Architecture", ["x86_64"])[0],
            }
        return False
    changed = False
    for item in root.iter():
        if local(item.tag) != "item":
            continue
        ident = child(item, "imageId")
        given = registered.get(ident.text) if ident is not None else None
        if given is None:
            continue
        for name, value in given.items():
            element = child(item, name)
            if element is not None and value is None:
                item.remove(element)
            elif value is not None:
                if element is None:
                    ns = item.tag[: item.tag.index("}") + 1] if item.tag.startswith("{") else ""
                    element = ET.SubElement(item, ns + name)
                element.text = value
            changed = True
    return changed


def rewrite_instances(action, root, params):
    """Applies the instance emulation; returns whether the response changed."""
    changed = False
    if action in ("RegisterImage", "DescribeImages"):
        return rewrite_images(action, root, params)
    if action == "RunInstances":
        for item, ident in instance_items(root):
            image = child(item, "imageId")
            launched[ident] = {
                "at": time.monotonic(),
                "image": image.text if image is not None else None,
                "pending": config["instance_pending_secs"],
                "initializing": config["instance_status_initializing_secs"],
            }
    elif action == "TerminateInstances":
        for key, values in params.items():
            if key.startswith("InstanceId."):
                terminated.setdefault(values[0], (time.monotonic(), config["instance_shutting_down_secs"]))
    elif action == "DescribeInstances":
        for item, ident in instance_items(root):
            delay = instance_delay(ident)
            if delay == "pending":
                set_state(item, 0, "pending")
                changed = True
            elif delay == "shutting-down":
                set_state(item, 32, "shutting-down")
                changed = True
    elif action == "DescribeInstanceStatus":
        for statuses in root.iter():
            if local(statuses.tag) != "instanceStatusSet":
                continue
            for item in list(statuses):
                ident = child(item, "instanceId")
                delay = instance_delay(ident.text) if ident is not None else None
                if delay == "pending":
                    statuses.remove(item)
                    changed = True
                elif delay == "initializing":
                    for name in ("instanceStatus", "systemStatus"):
                        summary = child(item, name)
                        if summary is not None:
                            for status in summary.iter():
                                if local(status.tag) == "status":
                                    status.text = "initializing"
                    changed = True
                elif delay == "shutting-down":
                    set_state(item, 32, "shutting-down")
                    changed = True
    elif action == "GetConsoleOutput":
        ident = child(root, "instanceId")
        output = child(root, "output")
        text = console_text(ident.text) if ident is not None else None
        if output is not None and text is not None:
            output.text = base64.b64encode(text.encode()).decode()
            changed = True
    return changed


INSTANCE_ACTIONS = ("RegisterImage", "DescribeImages", "RunInstances", "TerminateInstances", "DescribeInstances", "DescribeInstanceStatus", "GetConsoleOutput")


def rewrite(action, body, params):
    """Applies the configured delays to a successful response."""
    if action in INSTANCE_ACTIONS:
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            return body
        with lock:
            changed = rewrite_instances(action, root, params)
        if not changed:
            return body
        if root.tag.startswith("{"):
            ET.register_namespace("", root.tag[1:].split("}")[0])
        return ET.tostring(root, encoding="utf-8", xml_declaration=True)
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
                stats = {"calls": calls, "latency_secs": injected, "order": order}
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
        params = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        action = params.get("Action", [""])[0]
        token = params.get("ClientToken", [None])[0] if action == "RunInstances" else None
        with lock:
            calls[action] = calls.get(action, 0) + 1
            order.append(action)
            lose = config["lose"].get(action, 0)
            if lose > 0:
                config["lose"][action] = lose - 1
            repeated = tokens.get(token) if token else None
            throttle = config["throttle"].get(action, 0)
            if throttle > 0:
                config["throttle"][action] = throttle - 1
            fail = config["fail"].get(action)
            if fail and fail.get("after", 0) > 0:
                # The first calls pass: only those after them fail.
                fail["after"] -= 1
                fail = None
            latency = config["latency"].get(action, 0)
            if latency > 0:
                injected[action] = injected.get(action, 0) + latency
        if latency > 0:
            time.sleep(latency)
        if throttle > 0:
            return self.reply(503, error_body("RequestLimitExceeded", "Request limit exceeded."))
        if fail:
            return self.reply(fail.get("status", 400), error_body(fail["code"], fail["message"]))
        with lock:
            unknown = not_yet_known(action, params)
        if unknown is not None:
            return self.reply(400, error_body(*unknown))
        if repeated is not None:
            # EC2's idempotency: the same token, the same instance, nothing new started.
            return self.reply(200, repeated)
        name = params.get("Name", [None])[0] if action == "RegisterImage" else None
        with lock:
            taken = name is not None and name in names.values()
        if taken:
            return self.reply(400, error_body("InvalidAMIName.Duplicate", f"AMI name {name} is already in use by AMI"))
        url = urllib.parse.urlsplit(self.upstream)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length", "connection")}
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        if response.status == 200:
            with lock:
                if name is not None:
                    ident = child(ET.fromstring(data), "imageId")
                    if ident is not None:
                        names[ident.text] = name
                elif action == "DeregisterImage":
                    names.pop(params.get("ImageId", [""])[0], None)
            if action in ("RegisterImage", "CopyImage"):
                self.tag_on_create(action, data, params, headers)
            data = rewrite(action, data, params)
            note_made(action, data)
            if token:
                with lock:
                    tokens.setdefault(token, data)
        if lose > 0:
            # Done by moto, but the answer is lost on the way back.
            return self.reply(500, error_body("InternalError", "An internal error has occurred (answer lost by the test proxy)."))
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


    def tag_on_create(self, action, data, params, headers):
        """Applies RegisterImage's or CopyImage's image TagSpecifications (moto ignores them)."""
        tags = image_tags(params)
        ident = child(ET.fromstring(data), "imageId") if tags else None
        if ident is None:
            return
        query = [("Action", "CreateTags"), ("Version", params.get("Version", ["2016-11-15"])[0]), ("ResourceId.1", ident.text)]
        for n, (key, value) in enumerate(tags, 1):
            query += [("Tag.%d.Key" % n, key), ("Tag.%d.Value" % n, value)]
        body = urllib.parse.urlencode(query).encode()
        url = urllib.parse.urlsplit(self.upstream)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        # The same headers: moto reads the region from the signature's scope.
        conn.request("POST", self.path, body=body, headers=headers)
        response = conn.getresponse()
        answer = response.read()
        conn.close()
        if response.status != 200:
            raise RuntimeError("tagging %s for %s: %s" % (ident.text, action, answer[:300]))


def main():
    port, upstream = int(sys.argv[1]), sys.argv[2]
    Handler.upstream = upstream
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
