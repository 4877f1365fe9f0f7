#!/usr/bin/python3
"""HTTPS client the gateway tests run from the ACME container (another machine on the network).

Subcommands print one JSON object: `handshake VERSION`, `burst N PATH`, `stream PATH`, `trickle PATH`.
"""

import http.client
import json
import socket
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HOST = "gateway.pli.test"
ROOT = "/tmp/pebble-root.pem"


def context() -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ROOT)
    return ctx


def handshake(version: str) -> dict:
    tls = getattr(ssl.TLSVersion, version)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    # Let this client offer old protocols at all; the server must be the one that says no.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = tls
    ctx.maximum_version = tls
    conn = http.client.HTTPSConnection(HOST, 443, context=ctx, timeout=10)
    try:
        conn.connect()
        return {"ok": True, "version": conn.sock.version()}
    except ssl.SSLError as exc:
        return {"ok": False, "reason": exc.reason}
    finally:
        conn.close()


def one_request(path: str) -> tuple[int, str, dict]:
    conn = http.client.HTTPSConnection(HOST, 443, context=context(), timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, response.read().decode(), headers
    finally:
        conn.close()


def burst(count: int, path: str) -> dict:
    with ThreadPoolExecutor(max_workers=count) as pool:
        results = list(pool.map(lambda _: one_request(path), range(count)))
    statuses = [status for status, _, _ in results]
    rejected = [(body, headers) for status, body, headers in results if status == 429]
    return {
        "statuses": statuses,
        "rejected_body": rejected[0][0] if rejected else None,
        "rejected_headers": rejected[0][1] if rejected else None,
    }


def trickle(path: str) -> dict:
    """A body announced as 100 bytes that comes one byte and then nothing: how long does the gateway
    keep the connection (it must not wait forever)?"""
    raw = socket.create_connection((HOST, 443), timeout=60)
    conn = context().wrap_socket(raw, server_hostname=HOST)
    conn.sendall(f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 100\r\n\r\nx".encode())
    start = time.monotonic()
    answer = b""
    try:
        while chunk := conn.recv(4096):
            answer += chunk
    except (OSError, ssl.SSLError):
        pass
    return {"closed_after_s": round(time.monotonic() - start, 1), "answer": answer.decode(errors="replace")[:200]}


def stream(path: str) -> dict:
    conn = http.client.HTTPSConnection(HOST, 443, context=context(), timeout=30)
    start = time.monotonic()
    conn.request("POST", path, body=b"{}", headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    arrivals = []
    while True:
        line = response.readline()
        if not line:
            break
        if line.startswith(b"data:"):
            arrivals.append(round(time.monotonic() - start, 3))
    return {
        "status": response.status,
        "content_type": response.getheader("Content-Type"),
        "content_encoding": response.getheader("Content-Encoding"),
        "arrivals": arrivals,
    }


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "handshake":
        print(json.dumps(handshake(args[0])))
    elif command == "burst":
        print(json.dumps(burst(int(args[0]), args[1])))
    elif command == "stream":
        print(json.dumps(stream(args[0])))
    elif command == "trickle":
        print(json.dumps(trickle(args[0])))
