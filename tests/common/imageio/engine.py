#!/usr/bin/env python3
"""A stand-in for the oVirt engine's REST calls CDI's importer makes (through go-ovirt), for tests/imageio.rs.

It answers as the engine does (XML, `Version: 4`, SSO password grant), and for each image transfer installs a real
ticket in a real ovirt-imageio daemon through the daemon's control socket, removing it on finalize or cancel, as the
engine has vdsm do. Its inventory comes from a JSON file; what happened to each transfer is written to a state file
after every change.

    engine.py CONFIG.json STATE.json PORT_FILE CERT KEY
"""

import http.client
import http.server
import json
import socket
import ssl
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET

config = json.load(open(sys.argv[1]))
state_path = sys.argv[2]
lock = threading.Lock()
transfers = {}
token = uuid.uuid4().hex


def save():
    with open(state_path + ".tmp", "w") as f:
        json.dump({"transfers": list(transfers.values())}, f)
    import os
    os.replace(state_path + ".tmp", state_path)


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost")
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


def control(method, path, body=None):
    conn = UnixConnection(config["control_socket"])
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data)
    resp = conn.getresponse()
    text = resp.read()
    conn.close()
    if resp.status >= 300:
        raise RuntimeError("control %s %s: %d %s" % (method, path, resp.status, text))
    return json.loads(text) if text else None


def fault(detail):
    return "<fault><reason>Operation Failed</reason><detail>[%s]</detail></fault>" % detail


def transfer_xml(t):
    urls = ""
    if t.get("transfer_url"):
        urls += "<transfer_url>%s</transfer_url>" % t["transfer_url"]
    if t.get("proxy_url"):
        urls += "<proxy_url>%s</proxy_url>" % t["proxy_url"]
    return ('<image_transfer href="/ovirt-engine/api/imagetransfers/%s" id="%s"><direction>download</direction>'
            "<format>%s</format><phase>%s</phase>%s</image_transfer>" % (t["id"], t["id"], t["format"], t["phase"],
                                                                         urls))


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body, content_type="application/xml"):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length).decode()

    def authorized(self):
        if self.headers.get("Authorization") != "Bearer " + token:
            self.reply(401, fault("not logged in"))
            return False
        return True

    def do_POST(self):
        body = self.body()
        path = self.path
        if path == "/ovirt-engine/sso/oauth/token":
            form = dict(p.split("=", 1) for p in body.split("&") if "=" in p)
            from urllib.parse import unquote_plus
            form = {k: unquote_plus(v) for k, v in form.items()}
            if form.get("username") == config["user"] and form.get("password") == config["password"]:
                return self.reply(200, json.dumps({"access_token": token, "token_type": "bearer"}),
                                  "application/json")
            return self.reply(400, json.dumps({
                "error": "access_denied",
                "error_description": "Cannot authenticate user '%s': The username or password is incorrect."
                % form.get("username")}), "application/json")
        if not self.authorized():
            return
        if path == "/ovirt-engine/api/imagetransfers":
            return self.add_transfer(body)
        parts = path.split("/")
        if len(parts) == 6 and parts[3] == "imagetransfers":
            return self.transfer_action(parts[4], parts[5])
        self.reply(404, fault("no such path " + path))

    def add_transfer(self, body):
        doc = ET.fromstring(body)
        image = doc.find("image")
        snap = doc.find("snapshot")
        fmt = doc.findtext("format")
        if image is not None:
            disk = config["disks"].get(image.get("id"))
            volume = disk and disk
        else:
            volume = None
            for d in config["disks"].values():
                volume = volume or d.get("snapshots", {}).get(snap.get("id"))
        if volume is None:
            return self.reply(404, fault("Entity not found"))
        key = "cow" if fmt == "cow" else "raw"
        backend = volume["urls"].get(key)
        if backend is None:
            return self.reply(400, fault("the volume cannot be downloaded as " + key))
        ticket = str(uuid.uuid4())
        tid = str(uuid.uuid4())
        control("PUT", "/tickets/" + ticket, {
            "uuid": ticket, "size": volume["sizes"][key], "url": backend, "timeout": config.get("ticket_timeout", 300),
            "ops": ["read"], "transfer_id": tid, "inactivity_timeout": 60})
        daemon = "https://127.0.0.1:%d/images/%s" % (config["daemon_port"], ticket)
        t = {"id": tid, "ticket": ticket, "format": fmt, "phase": "initializing", "polls": 0,
             "extends": 0, "subject": (image if image is not None else snap).get("id")}
        if config.get("broken_transfer_url"):
            t["transfer_url"] = "https://127.0.0.1:%d/images/%s" % (config["broken_transfer_url"], ticket)
            t["proxy_url"] = daemon
        else:
            t["transfer_url"] = daemon
        with lock:
            transfers[tid] = t
            save()
        self.reply(201, transfer_xml(t))

    def transfer_action(self, tid, action):
        with lock:
            t = transfers.get(tid)
            if t is None:
                return self.reply(404, fault("Entity not found"))
            if action == "extend":
                t["extends"] += 1
                control("PATCH", "/tickets/" + t["ticket"], {"timeout": config.get("ticket_timeout", 300)})
            elif action in ("finalize", "cancel"):
                try:
                    # What the daemon says it sent: the union of the byte ranges its reads covered.
                    t["transferred"] = control("GET", "/tickets/" + t["ticket"]).get("transferred")
                    control("DELETE", "/tickets/" + t["ticket"])
                except (OSError, RuntimeError) as e:
                    # A dead daemon, or a ticket already removed (a paused transfer), holds nothing; the engine still
                    # ends the transfer.
                    t["daemon_error"] = str(e)
                t["phase"] = "finished_success" if action == "finalize" else "cancelled"
            else:
                return self.reply(404, fault("no action " + action))
            save()
        self.reply(200, "<action><status>complete</status></action>")

    def do_GET(self):
        if not self.authorized():
            return
        parts = self.path.split("/")
        if len(parts) == 5 and parts[3] == "disks":
            disk = config["disks"].get(parts[4])
            if disk is None:
                return self.reply(404, fault("Entity not found: " + parts[4]))
            return self.reply(200, '<disk href="/ovirt-engine/api/disks/%s" id="%s"><total_size>%d</total_size>'
                              "<image_id>%s</image_id><storage_domains><storage_domain id=\"sd1\"/>"
                              "</storage_domains></disk>" % (parts[4], parts[4], disk["sizes"]["raw"],
                                                             disk.get("image_id", "")))
        if len(parts) == 6 and parts[3] == "storagedomains" and parts[5] == "disksnapshots":
            items = "".join('<disk_snapshot id="%s"><actual_size>%d</actual_size></disk_snapshot>'
                            % (sid, s["sizes"]["cow"]) for d in config["disks"].values()
                            for sid, s in d.get("snapshots", {}).items())
            return self.reply(200, "<disk_snapshots>%s</disk_snapshots>" % items)
        if len(parts) == 5 and parts[3] == "imagetransfers":
            with lock:
                t = transfers.get(parts[4])
                if t is None:
                    return self.reply(404, fault("Entity not found"))
                t["polls"] += 1
                # The first poll still sees it initializing, as a real engine often does.
                if t["phase"] == "initializing" and t["polls"] > 1:
                    time.sleep(config.get("transferring_delay", 0))
                    t["phase"] = "transferring"
                save()
                return self.reply(200, transfer_xml(t))
        self.reply(404, fault("no such path " + self.path))


def watch_inactivity(limit):
    """As the engine watches a transfer: once its ticket has been idle (no request in progress at the daemon) for
    more than `limit` seconds, the transfer is paused by the system and its ticket removed."""
    while True:
        time.sleep(0.5)
        with lock:
            for t in transfers.values():
                if t["phase"] != "transferring":
                    continue
                try:
                    idle = control("GET", "/tickets/" + t["ticket"]).get("idle_time", 0)
                except (OSError, RuntimeError):
                    continue
                t["max_idle"] = max(t.get("max_idle", 0), idle)
                if idle > limit:
                    control("DELETE", "/tickets/" + t["ticket"])
                    t["phase"] = "paused_system"
                    t["paused_after_idle"] = idle
                save()


if config.get("inactivity_pause"):
    threading.Thread(target=watch_inactivity, args=(config["inactivity_pause"],), daemon=True).start()

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[4], sys.argv[5])
server.socket = context.wrap_socket(server.socket, server_side=True)
with lock:
    save()
with open(sys.argv[3] + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
import os
os.replace(sys.argv[3] + ".tmp", sys.argv[3])
server.serve_forever()
