"""A Hugging Face Hub on 127.0.0.1 that speaks as much of the Hub's HTTP API as huggingface_hub's create_repo and
upload_folder use (create a repo, ask each file's upload mode, commit the files inline), and keeps what it was sent:
the tests check a push against the files that arrive, without the network."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def metadata_errors(readme: str) -> list[str]:
    """What the Hub would refuse in a README's YAML header, as far as huggingface_hub can tell: a header that does not
    parse, or a model-index its own reader cannot turn into results."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    try:
        data = ModelCard(readme).data.to_dict()
        if "model-index" in data:
            model_index_to_eval_results(data["model-index"])
    except Exception as error:  # the Hub answers any refusal with 400 and its message
        return [f"{type(error).__name__}: {error}"]
    return []


class LocalHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}, "commits": [summary]}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append(f"POST {self.path}")
                if not (self.headers.get("Authorization") or "").startswith("Bearer "):
                    return self.reply(401, {"error": "Invalid credentials in Authorization header"})
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["api", "repos", "create"]:
                    request = json.loads(body)
                    owner, name = request.get("organization"), request["name"]
                    repo = f"{owner}/{name}" if owner else name
                    private = request.get("visibility") == "private" or bool(request.get("private"))
                    hub.repos.setdefault(repo, {"private": private, "files": {}, "commits": []})
                    return self.reply(200, {"url": f"{hub.url}/{repo}", "name": repo})
                if parts[:2] == ["api", "validate-yaml"]:  # the README's metadata, read by huggingface_hub itself
                    errors = metadata_errors(json.loads(body)["content"])
                    return self.reply(400 if errors else 200, {"errors": [{"message": e} for e in errors]})
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("preupload", "commit"):
                    repo = f"{parts[2]}/{parts[3]}"
                    if repo not in hub.repos:
                        return self.reply(404, {"error": f"Repository {repo} not found"})
                    if parts[4] == "preupload":
                        files = json.loads(body)["files"]
                        modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                        return self.reply(200, {"files": modes, "commitOid": "0" * 40})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            hub.repos[repo]["commits"].append(item["value"]["summary"])
                        elif item["key"] == "file":
                            content = item["value"]["content"]
                            hub.repos[repo]["files"][item["value"]["path"]] = base64.b64decode(content)
                    return self.reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40})
                return self.reply(404, {"error": f"not served here: {self.path}"})

            def do_GET(self) -> None:
                hub.requests.append(f"GET {self.path}")
                return self.reply(404, {"error": f"not served here: {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LocalHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
