#!/usr/bin/env python3
"""A webhook receiver for the tests that checks signatures with its own implementation of
the Standard Webhooks specification (https://www.standardwebhooks.com/), written from the
spec with Python's standard library, independent of mail2ticket's code:

    signed content  = "{webhook-id}.{webhook-timestamp}.{body}"
    signature       = base64(HMAC-SHA256(base64decode(secret without "whsec_"), content))
    webhook-signature holds space-separated "v1,<signature>" entries; one must match,
    and webhook-timestamp must be within 5 minutes of now.

Usage: webhook_receiver.py PORT SECRET LOG. Paths choose the behaviour:
  /ok     200
  /flaky  503 on the first attempt of each webhook-id, then 200
  /gone   410
  /hang   no answer for 30 s
Every request is appended to LOG as a JSON line: path, id, timestamp, verified, status,
body (parsed JSON). The port is printed once listening.
"""

import base64
import hashlib
import hmac
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, SECRET, LOG = int(sys.argv[1]), sys.argv[2], sys.argv[3]
KEY = base64.b64decode(SECRET[len("whsec_"):])
TOLERANCE = 5 * 60
seen = set()
lock = threading.Lock()


def verify(headers, body):
    msg_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    signatures = headers.get("webhook-signature", "")
    if not msg_id or not timestamp.isdigit():
        return False
    if abs(time.time() - int(timestamp)) > TOLERANCE:
        return False
    content = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(KEY, content, hashlib.sha256).digest()).decode()
    for entry in signatures.split(" "):
        version, _, signature = entry.partition(",")
        if version == "v1" and hmac.compare_digest(signature, expected):
            return True
    return False


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        msg_id = self.headers.get("webhook-id", "")
        with lock:
            first = (self.path, msg_id) not in seen
            seen.add((self.path, msg_id))
        if self.path == "/hang":
            time.sleep(30)
            return
        status = {"/ok": 200, "/gone": 410}.get(self.path, 200)
        if self.path == "/flaky" and first:
            status = 503
        record = {
            "path": self.path,
            "id": msg_id,
            "timestamp": self.headers.get("webhook-timestamp"),
            "verified": verify(self.headers, body),
            "status": status,
            "body": json.loads(body or b"null"),
        }
        with lock, open(LOG, "a") as log:
            log.write(json.dumps(record) + "\n")
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
