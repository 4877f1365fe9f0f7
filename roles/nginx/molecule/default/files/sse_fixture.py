#!/usr/bin/python3
"""Stand-in upstream for the gateway tests: JSON for GET, a slow server-sent event stream for POST."""

import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": "fixture", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        # As the app names the key's id and tenant, for the gateway's log alone.
        self.send_header("X-PLI-Key-Id", "fixturekey")
        self.send_header("X-PLI-Tenant", "fixture-tenant")
        if self.path == "/" or self.path.startswith("/chat/"):
            # As the app sends its chat page: the gateway must send its own headers in their place.
            self.send_header("Content-Security-Policy", "upstream-policy")
            self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        for index in range(5):
            self.wfile.write(f"data: {json.dumps({'index': index})}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.5)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (BaseHTTPRequestHandler's name)
        pass


ThreadingHTTPServer(("127.0.0.1", 8000), Handler).serve_forever()
