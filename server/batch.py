"""`remix-serve batch`: a file of requests in OpenAI's Batch format, answered offline by the same
engine and the same app as the online server (each line goes through the app's routes in
process, so validation, errors and answers are the server's own).

Input lines: {"custom_id", "method": "POST", "url": "/v1/completions" or
"/v1/chat/completions", "body": {...}}. Output lines, in input order: {"id", "custom_id",
"response": {"status_code", "request_id", "body"}, "error": null}; a line that is not such a
request gets "response": null and "error": {"code", "message"}.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

from tqdm import tqdm

from server.engine_client import RemixEngine
from server.settings import ServerSettings

URLS = ("/v1/completions", "/v1/chat/completions")


class BadLine(ValueError):
    """A line that is not a batch request; its message says why."""


def parse_line(line: str) -> tuple[str | None, str, dict[str, Any]]:
    """(custom_id, url, body) of one input line; raises BadLine."""
    try:
        item = json.loads(line)
    except ValueError as e:
        raise BadLine(f"not JSON: {e}") from None
    if not isinstance(item, dict):
        raise BadLine("a line must be a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str):
        raise BadLine("custom_id must be a string")
    if item.get("method") != "POST":
        raise BadLine("method must be POST")
    if item.get("url") not in URLS:
        raise BadLine(f"url must be one of {', '.join(URLS)}")
    body = item.get("body")
    if not isinstance(body, dict):
        raise BadLine("body must be a JSON object")
    if body.get("stream"):
        raise BadLine("body.stream: a batch answers whole responses, not streams")
    return custom_id, item["url"], body


def custom_id_of(line: str) -> str | None:
    try:
        value = json.loads(line).get("custom_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


async def post(app: Any, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """One POST through the ASGI app, in process: (status, JSON body)."""
    data = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "scheme": "http", "server": ("batch", 0), "client": ("batch", 0),
        "headers": [(b"content-type", b"application/json")],
    }  # fmt: skip
    sent, done = False, asyncio.Event()
    status, chunks = 0, []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}
        await done.wait()  # the client stays connected until the answer is complete
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    await app(scope, receive, send)
    return status, json.loads(b"".join(chunks))


async def answer_line(app: Any, line: str, limit: asyncio.Semaphore) -> dict[str, Any]:
    out: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": None}
    try:
        custom_id, url, body = parse_line(line)
    except BadLine as e:
        return {**out, "custom_id": custom_id_of(line), "response": None,
                "error": {"code": "invalid_request", "message": str(e)}}  # fmt: skip
    async with limit:
        status, answer = await post(app, url, body)
    response = {"status_code": status, "request_id": uuid.uuid4().hex, "body": answer}
    return {**out, "custom_id": custom_id, "response": response, "error": None}


async def wait_ready(engine: RemixEngine) -> None:
    while not engine.ready:
        if engine.failed:
            raise RuntimeError(f"the engine failed to start: {engine.error}")
        await asyncio.sleep(0.2)


async def run_batch(
    engine: RemixEngine, settings: ServerSettings, input_path: Path, output_path: Path
) -> int:
    """Answer every line of input_path into output_path; returns the number of lines that got
    an error object or a non-200 response."""
    from server.app import create_app

    lines = [line for line in input_path.read_text().splitlines() if line.strip()]
    app = create_app(engine, settings)
    # At most max_queue requests in flight: the server's admission would refuse more (429).
    limit = asyncio.Semaphore(settings.max_queue)
    async with app.router.lifespan_context(app):
        await wait_ready(engine)
        tasks = [asyncio.ensure_future(answer_line(app, line, limit)) for line in lines]
        with tqdm(total=len(tasks), desc="batch", unit="req") as bar:
            for task in tasks:
                task.add_done_callback(lambda _: bar.update())
            results = await asyncio.gather(*tasks)
    with output_path.open("w") as f:
        for r in results:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return sum(1 for r in results if r["error"] or r["response"]["status_code"] != 200)
