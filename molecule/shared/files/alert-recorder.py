#!/usr/bin/python3
"""A webhook receiver for the scenario: each POST body Alertmanager sends is appended, one JSON per line."""

import json
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

RECORD = Path("/var/lib/alert-recorder/alerts.jsonl")


class Recorder(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        json.loads(body)
        with RECORD.open("ab") as record:
            record.write(body.replace(b"\n", b"") + b"\n")
        self.send_response(200)
        self.end_headers()


HTTPServer(("127.0.0.1", 5001), Recorder).serve_forever()
