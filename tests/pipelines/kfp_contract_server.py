"""A loopback HTTP server speaking the KFP v2beta1 REST endpoints kfp.Client 2.17 uses.

It checks request bodies the way the API server would reject bad ones (unknown experiment,
missing pipeline spec, a cron KFP can't parse) and records every request for assertions. No
live Kubeflow is involved: this pins the contract the client relies on.
"""

from __future__ import annotations

import http.server
import json
import threading
import urllib.parse


class KFPContractServer:
    def __init__(self, token: str | None = None):
        self.token = token
        self.requests: list[dict] = []
        self.experiments: dict[str, dict] = {}
        self.runs: list[dict] = []
        self.recurring: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self, code: int, obj: dict):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                body = json.loads(raw) if raw else None
                url = urllib.parse.urlparse(self.path)
                outer.requests.append({"method": self.command, "path": url.path, "query": url.query, "body": body,
                                       "auth": self.headers.get("Authorization")})
                if outer.token and self.headers.get("Authorization") != f"Bearer {outer.token}":
                    return self._reply(401, {"error": "unauthenticated"})
                code, obj = outer.route(self.command, url.path, urllib.parse.parse_qs(url.query), body)
                self._reply(code, obj)

            do_GET = do_POST = do_DELETE = _handle

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # -- the API ----------------------------------------------------------------------------
    def route(self, method: str, path: str, query: dict, body):
        base = "/apis/v2beta1"
        if path == f"{base}/healthz":
            return 200, {"multi_user": False}
        if path == f"{base}/experiments" and method == "GET":
            flt = json.loads(query.get("filter", ["{}"])[0] or "{}")
            names = [p.get("stringValue") for p in flt.get("predicates", []) if p.get("key") == "display_name"]
            exps = [e for e in self.experiments.values() if not names or e["display_name"] in names]
            return 200, {"experiments": exps, "total_size": len(exps)}
        if path == f"{base}/experiments" and method == "POST":
            if not body or not body.get("display_name"):
                return 400, {"error": "display_name required"}
            exp = {"experiment_id": f"exp-{len(self.experiments) + 1}", "display_name": body["display_name"]}
            self.experiments[exp["experiment_id"]] = exp
            return 200, exp
        if path == f"{base}/runs" and method == "POST":
            err = self._check_spec(body)
            if err:
                return 400, {"error": err}
            run = {"run_id": f"run-{len(self.runs) + 1}", **body}
            self.runs.append(run)
            return 200, run
        if path == f"{base}/recurringruns" and method == "POST":
            err = self._check_spec(body)
            cron = (body or {}).get("trigger", {}).get("cron_schedule", {}).get("cron")
            if not err and (not cron or len(cron.split()) != 6):
                err = f"invalid cron {cron!r}: KFP needs 6 fields (seconds first)"
            if err:
                return 400, {"error": err}
            rr = {"recurring_run_id": f"rr-{len(self.recurring) + 1}", **body}
            self.recurring.append(rr)
            return 200, rr
        return 404, {"error": f"no route {method} {path}"}

    def _check_spec(self, body) -> str | None:
        if not body:
            return "empty body"
        exp = body.get("experiment_id")
        if exp and exp not in self.experiments:
            return f"experiment {exp} not found"
        spec = (body.get("pipeline_spec") or {}).get("pipeline_spec") or body.get("pipeline_spec")
        if not spec or "root" not in spec or "pipelineInfo" not in spec:
            return "pipeline_spec missing or malformed"
        return None

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
