"""A stand-in OpenAI-compatible chat server on 127.0.0.1 that records what it was sent.

It answers each prompt with ``reply(prompt)``, and can be told to answer slowly, fail with a
status a number of times, or return garbage, so the HTTP judge's timeouts, retries and bounded
concurrency are tested against a server that cannot lie about what it saw.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JudgeServer:
    def __init__(self, reply: Callable[[str], str] = lambda prompt: "Yes.") -> None:
        self.reply = reply
        self.delay = 0.0  # seconds before each answer
        self.slow_first = 0  # this many requests wait `slow_delay` (to trip the client's timeout)
        self.slow_delay = 0.0
        self.fail_first = 0  # this many requests get `fail_status`
        self.fail_status = 500
        self.garbage = False
        self.requests: list[dict] = []  # {"path", "headers", "body"} in arrival order
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    number = len(server.requests)
                    server.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body}
                    )
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                try:
                    time.sleep(server.slow_delay if number < server.slow_first else server.delay)
                    if number < server.fail_first:
                        self._send(server.fail_status, b'{"error": "try again"}')
                    elif server.garbage:
                        self._send(200, b"<html>not json</html>")
                    else:
                        prompt = body["messages"][-1]["content"]
                        answer = {"choices": [{"message": {"content": server.reply(prompt)}}]}
                        self._send(200, json.dumps(answer).encode())
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _send(self, status: int, payload: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> JudgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def prompts(self) -> list[str]:
        return [r["body"]["messages"][-1]["content"] for r in self.requests]
