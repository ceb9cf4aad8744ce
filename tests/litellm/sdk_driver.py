"""LiteLLM's SDK under govledger, for tests/test_litellm.py: run in .venv-litellm,
it reads a JSON spec on stdin, makes the calls it names through a `litellm.Router`
on proxy.yaml's mock models with `GovledgerCallback` registered, flushes the usage
buffer and prints one JSON answer per call on stdout.

The spec: {"url", "token", "reserve": bool, "calls": [{"name", "model", "key"?
(a govledger key's secret), "stream"?, "max_tokens"?}], "concurrent": bool}.
An answer: {"name", "status" (200, or the refusal's http_status, or LiteLLM's
status of a failed call), "reason"?, "model"?, "prompt_tokens"?,
"completion_tokens"?, "seconds"}.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # after the offline switch above: it reads it on import
import yaml
from govledger_client.litellm import (
    GovledgerCallback,
    GovledgerRefusal,
    Settings,
)

CONFIG = Path(__file__).with_name("proxy.yaml")


async def make(router: litellm.Router, call: dict[str, Any]) -> dict[str, Any]:
    metadata = {"govledger_key": call["key"]} if "key" in call else {}
    started = time.monotonic()
    answer: dict[str, Any] = {"name": call["name"]}
    try:
        if call.get("stream"):
            chunks = await router.acompletion(
                model=call["model"],
                messages=[{"role": "user", "content": "hello"}],
                max_tokens=call.get("max_tokens", 20),
                stream=True,
                stream_options={"include_usage": True},
                metadata=metadata,
            )
            usage = None
            async for chunk in chunks:
                usage = getattr(chunk, "usage", None) or usage
            model = chunk.model
        else:
            response = await router.acompletion(
                model=call["model"],
                messages=[{"role": "user", "content": "hello"}],
                max_tokens=call.get("max_tokens", 20),
                metadata=metadata,
            )
            usage, model = (
                response.usage,
                response._hidden_params.get("litellm_model_name"),
            )
        answer.update(
            status=200,
            model=model,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
        )
    except GovledgerRefusal as refused:
        answer.update(status=refused.http_status, reason=refused.reason)
    except Exception as exc:  # a failed call: LiteLLM's status
        answer.update(
            status=getattr(exc, "status_code", 500), reason=type(exc).__name__
        )
    answer["seconds"] = time.monotonic() - started
    return answer


async def main() -> None:
    spec = json.load(sys.stdin)
    config = yaml.safe_load(CONFIG.read_text())
    router = litellm.Router(
        model_list=config["model_list"], **config["router_settings"]
    )
    callback = GovledgerCallback(
        Settings(
            url=spec["url"],
            token=spec["token"],
            reserve=spec["reserve"],
            check_timeout=5.0,
        ),
        router=router,
    )
    litellm.callbacks = [callback]
    if spec.get("concurrent"):
        answers = await asyncio.gather(*(make(router, c) for c in spec["calls"]))
    else:
        answers = [await make(router, c) for c in spec["calls"]]
    # Success and failure events run as tasks after the calls return: wait (a
    # bounded poll on LiteLLM's own logging) until each admitted call has ended.
    deadline = time.monotonic() + 10
    while callback.open_calls and time.monotonic() < deadline:  # noqa: ASYNC110 -- LiteLLM's tasks signal nothing
        await asyncio.sleep(0.02)
    await callback.close(grace=10)
    stats = callback.recorder.stats
    for answer in answers:
        print(json.dumps(answer))
    print(json.dumps({"stats": {"acked": stats.acked, "buffered": stats.buffered}}))


if __name__ == "__main__":
    asyncio.run(main())
