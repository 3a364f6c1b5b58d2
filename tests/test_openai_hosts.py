"""Static hosts with `api = "openai"` (vLLM, llama-server, SGLang, TGI, LM Studio) through the real server.

Each such host is the simulated Ollama's OpenAI surface behind `OpenAIServer`, which answers only
`/v1/*` (everything else is 404, and counted), checks its own bearer token as `vllm --api-key` does,
and lists its models under their exact ids, as vLLM does. So every answer proves that nothing of
Ollama's native API was used, and that the host's own key (never the client's) reached it.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from anyio.from_thread import start_blocking_portal

from gpumanager.app import build_app
from gpumanager.config import load
from gpumanager.errors import ConfigError
from gpumanager.sim import SimOllama, expected_text, running_server
from gpumanager.sim.wire import embedding_for
from tests.harness import FAST_TIMING, SimHost, Stack, running_stack, wait_until

HF = "Qwen/Qwen2.5-0.5B-Instruct"
EMBED = "nomic-ai/nomic-embed-text-v1.5"
VLLM_KEY = "sk-vllm-only-for-this-host"
FLEET_TOKEN = "fleet-door-token"


class OpenAIServer:
    """An OpenAI-compatible server in front of a `SimOllama`: `/v1/*` only, behind an optional token."""

    def __init__(self, sim: SimOllama, token: str | None = None) -> None:
        self.sim, self.token = sim, token
        self.requests: Counter[str] = Counter()  # every path that reached it, refused ones included
        self.authorization: set[str] = set()  # every Authorization header it was sent ("" for none)
        self.models_down = False  # `/v1/models` answers 503: a server that stopped answering

    @property
    def native(self) -> list[str]:
        """The paths outside `/v1/` that anyone tried on it."""
        return [path for path in self.requests if not path.startswith("/v1/")]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path: str = scope["path"]
        self.requests[path] += 1
        headers = dict(scope["headers"])
        self.authorization.add(headers.get(b"authorization", b"").decode())
        if not path.startswith("/v1/"):
            return await _json(send, 404, {"detail": "Not Found"})
        if self.token is not None and headers.get(b"authorization") != f"Bearer {self.token}".encode():
            return await _json(send, 401, {"error": "Unauthorized"})
        if path == "/v1/models":
            if self.models_down:
                return await _json(send, 503, {"error": {"message": "server is not ready", "type": "api_error"}})
            listed = [m.removesuffix(":latest") if "/" in m else m for m in self.sim.models]
            data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "vllm"} for m in listed]
            return await _json(send, 200, {"object": "list", "data": data})
        await self.sim(scope, receive, send)


async def _json(send: Any, status: int, body: Any) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


@dataclass
class OpenAIHost:
    name: str
    models: tuple[str, ...]
    api_key_env: str | None = None
    token: str | None = None
    url_suffix: str = ""  # what follows the server's root in the config's `url` ("/v1" as clients write it)


def _host_entry(spec: OpenAIHost, url: str) -> str:
    lines = [
        "[[hosts]]",
        f'name = "{spec.name}"',
        f'url = "{url}{spec.url_suffix}"',
        'api = "openai"',
        "slots = 4",
    ]
    if spec.api_key_env:
        lines.append(f'api_key_env = "{spec.api_key_env}"')
    return "\n".join(lines)


@contextlib.contextmanager
def openai_stack(
    tmp_path: Path, hosts: list[OpenAIHost], *, native: list[SimHost] | None = None, environ: dict[str, str]
) -> Iterator[tuple[Stack, dict[str, OpenAIServer]]]:
    """gpumanager in front of OpenAI-compatible static hosts (and plain Ollama ones, if any)."""
    with start_blocking_portal() as portal, contextlib.ExitStack() as exits:
        servers: dict[str, OpenAIServer] = {}
        entries = []
        for spec in hosts:
            server = OpenAIServer(SimOllama(name=spec.name, models=spec.models, token_delay=0.001), spec.token)
            running = exits.enter_context(portal.wrap_async_context_manager(running_server(server)))
            servers[spec.name] = server
            entries.append(_host_entry(spec, running.url))
        extra = "\n\n".join([FAST_TIMING, *entries])
        with running_stack(tmp_path, native or [], extra=extra, environ=environ) as stack:
            yield stack, servers


def host_of(stack: Stack, name: str) -> Any:
    return stack.call(lambda: stack.runtime.fleet.hosts[name])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, OpenAIServer]]]:
    hosts = [
        OpenAIHost("vllm", (HF, EMBED), api_key_env="VLLM_API_KEY", token=VLLM_KEY, url_suffix="/v1"),
        OpenAIHost("llama-server", ("llama3.2:latest",)),
    ]
    environ = {"VLLM_API_KEY": VLLM_KEY, "GPUMANAGER_UPSTREAM_TOKEN": FLEET_TOKEN}
    with openai_stack(
        tmp_path_factory.mktemp("oa"), hosts, native=[SimHost("lab-box", models=("phi3:latest",))], environ=environ
    ) as pair:
        yield pair


def test_the_openai_client_is_served_streamed_and_whole(fleet: tuple[Stack, dict[str, OpenAIServer]]) -> None:
    stack, servers = fleet
    with openai.OpenAI(base_url=stack.v1, api_key=stack.user_key, max_retries=0) as client:
        stream = client.chat.completions.create(
            model=HF, messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=6
        )
        pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        assert pieces == [f"tok{i} " for i in range(6)]
        whole = client.chat.completions.create(model=HF, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert whole.choices[0].message.content == expected_text(4) and whole.usage is not None
        assert whole.usage.completion_tokens == 4
        completion = client.completions.create(model=HF, prompt="once upon", max_tokens=3)
        assert completion.choices[0].text == expected_text(3)
        streamed = client.completions.create(model=HF, prompt="once upon", max_tokens=3, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == expected_text(3)
        vectors = client.embeddings.create(model=EMBED, input=["alpha", "beta"], encoding_format="float")
        for item, text in zip(vectors.data, ("alpha", "beta"), strict=True):
            assert item.embedding == pytest.approx(embedding_for(text, 8))
        short = client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert short.choices[0].message.content == expected_text(2)
    answer = httpx.post(
        stack.v1 + "/chat/completions",
        headers=stack.headers(),
        timeout=30,
        json={"model": HF, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]},
    )
    assert answer.headers["x-gpumanager-host"] == "vllm"
    assert servers["vllm"].requests["/v1/chat/completions"] >= 3
    assert servers["vllm"].native == [] and servers["llama-server"].native == []


def test_the_ollama_client_is_served_through_translation(fleet: tuple[Stack, dict[str, OpenAIServer]]) -> None:
    stack, servers = fleet
    with ollama.Client(host=stack.url, headers=stack.headers()) as client:
        chunks = list(
            client.chat(model=HF, messages=[{"role": "user", "content": "x"}], stream=True, options={"num_predict": 5})
        )
        assert [c.message.content for c in chunks if c.message.content] == [f"tok{i} " for i in range(5)]
        assert chunks[-1].done and chunks[-1].eval_count == 5
        whole = client.chat(model=HF, messages=[{"role": "user", "content": "x"}], options={"num_predict": 3})
        assert whole.message.content == expected_text(3) and whole.done_reason == "stop"
        generated = client.generate(model=HF, prompt="once", options={"num_predict": 4})
        assert generated.response == expected_text(4)
        parts = list(client.generate(model=HF, prompt="once", stream=True, options={"num_predict": 4}))
        assert "".join(p.response for p in parts) == expected_text(4) and parts[-1].done
        local = client.chat(model="llama3.2", messages=[{"role": "user", "content": "x"}], options={"num_predict": 2})
        assert local.message.content == expected_text(2)  # `llama3.2` is listed by its server as `llama3.2:latest`
        embedded = client.embed(model=EMBED, input=["alpha", "beta"])
        for vector, text in zip(embedded.embeddings, ("alpha", "beta"), strict=True):
            assert list(vector) == pytest.approx(embedding_for(text, 8))
        legacy = client.embeddings(model=EMBED, prompt="alpha")
        assert list(legacy.embedding) == pytest.approx(embedding_for("alpha", 8))
    assert servers["vllm"].requests["/v1/embeddings"] >= 2
    assert servers["llama-server"].requests["/v1/chat/completions"] >= 1
    assert servers["vllm"].native == [] and servers["llama-server"].native == []


def test_model_lists_show_what_the_servers_list(fleet: tuple[Stack, dict[str, OpenAIServer]]) -> None:
    stack, _ = fleet
    with httpx.Client(base_url=stack.url, headers=stack.headers(), timeout=30) as client:
        tags = {m["name"] for m in client.get("/api/tags").json()["models"]}
        assert tags == {HF, EMBED, "llama3.2:latest", "phi3:latest"}  # exact ids: no `:latest` added
        models = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert models == tags
        one = client.get(f"/v1/models/{HF}")
        assert one.status_code == 200 and one.json()["id"] == HF
    with ollama.Client(host=stack.url, headers=stack.headers()) as oc:
        assert HF in {m.model for m in oc.list().models}
    with openai.OpenAI(base_url=stack.v1, api_key=stack.user_key, max_retries=0) as client:
        assert {m.id for m in client.models.list()} == tags
    discover = httpx.get(stack.url + "/gpu/discover", headers=stack.headers(stack.admin_key), timeout=30).json()
    vllm = next(g for g in discover["gpus"] if g["name"] == "vllm")
    assert vllm["healthy"] and vllm["models"] == sorted([HF, EMBED]) and vllm["api"] == "openai"
    assert not vllm["url"].endswith("/v1")  # the server's root: the routes add /v1


def test_each_host_gets_its_own_token_and_never_the_clients_key(fleet: tuple[Stack, dict[str, OpenAIServer]]) -> None:
    stack, servers = fleet
    key = stack.new_key("token-check")
    for model in (HF, "llama3.2", "phi3"):
        answer = httpx.post(
            stack.url + "/api/generate",
            headers=stack.headers(key),
            timeout=30,
            json={"model": model, "prompt": "x", "stream": False, "options": {"num_predict": 1}},
        )
        assert answer.status_code == 200, answer.text
    assert servers["vllm"].authorization == {f"Bearer {VLLM_KEY}"}  # probes and requests alike
    assert servers["llama-server"].authorization == {f"Bearer {FLEET_TOKEN}"}  # no key of its own: the fleet's
    assert stack.sims["lab-box"].last_headers["authorization"] == f"Bearer {FLEET_TOKEN}"
    everything = str(servers["vllm"].authorization | servers["llama-server"].authorization)
    assert key not in everything and stack.user_key not in everything


@pytest.mark.parametrize("environ", [{}, {"VLLM_API_KEY": ""}])
def test_a_missing_api_key_env_fails_at_start_naming_it(tmp_path: Path, environ: dict[str, str]) -> None:
    (tmp_path / "config.toml").write_text(
        '[[hosts]]\nname = "vllm"\nurl = "http://127.0.0.1:9"\napi = "openai"\napi_key_env = "VLLM_API_KEY"\n'
    )
    with pytest.raises(ConfigError, match=r"^VLLM_API_KEY is not set: put it in \.env or the environment") as caught:
        build_app(load(tmp_path / "config.toml"), environ=environ)
    assert "vllm" in str(caught.value)


def test_a_host_whose_models_stop_answering_is_skipped_until_they_answer(tmp_path: Path) -> None:
    hosts = [OpenAIHost("lm-a", ("llama3.2:latest",)), OpenAIHost("lm-b", ("llama3.2:latest",))]
    with openai_stack(tmp_path, hosts, environ={}) as (stack, servers):
        wait_until(lambda: host_of(stack, "lm-a").healthy and host_of(stack, "lm-b").healthy, timeout=10)
        servers["lm-a"].models_down = True
        wait_until(lambda: not host_of(stack, "lm-a").healthy, timeout=10)
        assert "/v1/models: HTTP 503" in host_of(stack, "lm-a").last_error
        served_before = servers["lm-a"].requests["/v1/chat/completions"]
        with openai.OpenAI(base_url=stack.v1, api_key=stack.new_key("other"), max_retries=0) as client:
            for _ in range(6):
                raw = client.chat.completions.with_raw_response.create(
                    model="llama3.2", messages=[{"role": "user", "content": "x"}], max_tokens=2
                )
                assert raw.headers["x-gpumanager-host"] == "lm-b"
                assert raw.parse().choices[0].message.content == expected_text(2)
        assert servers["lm-a"].requests["/v1/chat/completions"] == served_before
        status = httpx.get(stack.url + "/gpu/lm-a/status", headers=stack.headers(stack.admin_key), timeout=30).json()
        assert status["healthy"] is False
        servers["lm-a"].models_down = False
        wait_until(lambda: host_of(stack, "lm-a").healthy, timeout=10)
        assert servers["lm-a"].native == [] and servers["lm-b"].native == []


def test_api_on_an_override_entry_is_refused_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[[hosts]]\nname = "gpu-1"\napi = "openai"\n')
    with pytest.raises(ConfigError, match=r"hosts\[0\]\.api: only a static host"):
        load(tmp_path / "config.toml")


def test_check_config_reads_an_openai_hosts_models_with_its_own_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpumanager.cli import main

    server = OpenAIServer(SimOllama(name="vllm", models=(HF,)), token=VLLM_KEY)
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(running_server(server)) as running:
        spec = OpenAIHost("vllm", (HF,), api_key_env="VLLM_API_KEY", url_suffix="/v1")
        (tmp_path / "config.toml").write_text(_host_entry(spec, running.url) + "\n")
        monkeypatch.setenv("VLLM_API_KEY", VLLM_KEY)
        assert main(["check-config", "--config", str(tmp_path / "config.toml")]) == 0
    out = capsys.readouterr().out
    assert HF in out and "(from config)" not in out
    assert server.requests["/v1/models"] == 1 and server.authorization == {f"Bearer {VLLM_KEY}"}
