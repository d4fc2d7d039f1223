#!/usr/bin/env python3
"""CDI's imageio copy, for comparison with boundimport (tests/imageio.rs): log in to the engine, start a download
transfer, then for each extent of the daemon's `extents` either seek past it (zero) or copy it with one Range GET
through the page cache onto the destination, one fsync at the end, finalize the transfer
(pkg/importer/imageio-datasource.go: StreamExtents, transferExtent).

    cdi_way.py ENGINE_API_URL USER PASSWORD DISK_ID CA_FILE DESTINATION [SNAPSHOT PREVIOUS SCRATCH_FILE]

With a snapshot, a warm migration's delta stage as CDI runs it (Transfer to scratch, then MergeDelta): the snapshot
downloaded as qcow2 into a scratch file through the page cache, its backing file checked against the previous
checkpoint, then `qemu-img rebase -p -u -F raw -b DESTINATION` and `qemu-img commit -p` with CDI's arguments.
"""

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET

api, user, password, disk, ca, dest = sys.argv[1:7]
context = ssl.create_default_context(cafile=ca)
origin = api.split("/ovirt-engine")[0]


def call(method, url, body=None, headers=None):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(request, context=context) as response:
        return response.read()


form = urllib.parse.urlencode({"grant_type": "password", "scope": "ovirt-app-api", "username": user,
                               "password": password}).encode()
token = json.loads(call("POST", origin + "/ovirt-engine/sso/oauth/token", form))["access_token"]
auth = {"Authorization": "Bearer " + token, "Version": "4", "Content-Type": "application/xml"}
delta = sys.argv[7:10]
subject = '<snapshot id="%s"/>' % delta[0] if delta else '<image id="%s"/>' % disk
body = ('<image_transfer>%s<direction>download</direction><format>%s</format>'
        "<inactivity_timeout>60</inactivity_timeout></image_transfer>" % (subject, "cow" if delta else "raw")).encode()
transfer = ET.fromstring(call("POST", api + "/imagetransfers", body, auth))
while transfer.findtext("phase") != "transferring":
    time.sleep(1)
    transfer = ET.fromstring(call("GET", api + "/imagetransfers/" + transfer.get("id"), None, auth))
url = transfer.findtext("transfer_url")
if delta:
    snapshot, previous, scratch = delta
    with urllib.request.urlopen(url, context=context) as response, open(scratch, "wb") as out:
        while True:
            chunk = response.read(32 << 10)
            if not chunk:
                break
            out.write(chunk)
    call("POST", api + "/imagetransfers/%s/finalize" % transfer.get("id"), b"<action/>", auth)
    info = json.loads(subprocess.check_output(["qemu-img", "info", "--output=json", scratch]))
    backing = os.path.basename(info.get("backing-filename", ""))
    if backing != previous:
        sys.exit("snapshot backing file '%s' does not match expected checkpoint '%s'" % (backing, previous))
    subprocess.check_call(["qemu-img", "rebase", "-p", "-u", "-F", "raw", "-b", dest, scratch],
                          stdout=subprocess.DEVNULL)
    subprocess.check_call(["qemu-img", "commit", "-p", scratch], stdout=subprocess.DEVNULL)
    sys.exit(0)
extents = json.loads(call("GET", url + "/extents"))
fd = os.open(dest, os.O_WRONLY)
with os.fdopen(fd, "wb", buffering=0) as out:
    for extent in extents:
        if extent["zero"]:
            continue
        start, end = extent["start"], extent["start"] + extent["length"] - 1
        request = urllib.request.Request(url, headers={"Range": "bytes=%d-%d" % (start, end)})
        with urllib.request.urlopen(request, context=context) as response:
            out.seek(start)
            while True:
                chunk = response.read(32 << 10)  # io.Copy's buffer
                if not chunk:
                    break
                out.write(chunk)
    os.fsync(out.fileno())
call("POST", api + "/imagetransfers/%s/finalize" % transfer.get("id"), b"<action/>", auth)
