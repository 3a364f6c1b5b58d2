"""A fake of AWS EC2 stop/start (REFERENCE.md section 5): moto's EC2 server behind a small timing proxy.

moto answers EC2 calls instantly: StartInstances says `pending` but DescribeInstances already says
`running`, StopInstances likewise, and it never runs out of capacity. `FakeEC2` runs moto's
`ThreadedMotoServer` on 127.0.0.1 and puts an ASGI proxy in front of it (`endpoint_url`, what the boto3
client under test uses). The proxy forwards every request and reads the Query API form body to apply
a timeline moto lacks:

* StartInstances on a stopped instance: moto starts it at once; for `boot_seconds` the proxy reports
  `pending` (0), then starts the instance's `SimOllama` and reports `running` (16).
* StopInstances: `stopping` (64) for `stop_seconds`, then the sim is killed (open connections reset,
  like a VM going away) and moto's `stopped` (80) shows through.
* A start while `stopping` is refused with `IncorrectInstanceState` (HTTP 400) without reaching moto.
* Knobs inject EC2-shaped errors (`<Response><Errors><Error>…`), hung starts and slow answers.

Responses are rewritten with ElementTree only where a reported state differs from moto's; other
responses pass through byte for byte. Instances live in a VPC 127.0.0.0/16 with addresses 127.0.1.2,
127.0.1.3, … (clear of FakeSurf's 127.0.0.N); each one's sim listens on `private_ip:ollama_port`.

moto keeps its backends in process-wide globals, so several fakes in one process would see each
other's instances. Each fake therefore uses its own random account (moto's `x-moto-account-id`
header, added by the proxy and by the fake's own client), which moto keeps apart.

All fake state lives in the event loop. Proxied requests and console changes take one lock, so a
DescribeInstances never sees moto's state without the overlay that belongs to it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from email.utils import formatdate
from functools import partial
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlencode
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape

import anyio
import anyio.lowlevel
import boto3
import httpx
from moto.server import ThreadedMotoServer
from starlette.types import Receive, Scope, Send

from gpumanager.sim import SimOllama, SimServer, running_server
from gpumanager.sim.server import free_port_on
from gpumanager.sim.wire import read_body
from tests.fakes.machine import MachineCloud, SimMachine, until

__all__ = ["FakeEC2", "free_port_for_all"]

_PREFIX = "127.0.1."  # instance addresses; FakeSurf uses 127.0.0.N
_VPC_CIDR, _SUBNET_CIDR = "127.0.0.0/16", "127.0.1.0/24"
_SPARE_ADDRESSES = 16  # how many instance addresses a chosen ollama_port is checked free on
_AMI = "ami-1e749f67"  # Ubuntu, from moto's built-in image list (moto/ec2/resources/amis.json.gz)
_CODES = {"pending": 0, "running": 16, "stopping": 64, "stopped": 80}
_DEFAULT_CODES = {500: "InternalError", 503: "Unavailable"}
_MESSAGES = {
    "InsufficientInstanceCapacity": "Insufficient capacity.",
    "InternalError": "An internal error has occurred.",
    "Unavailable": "The service is unavailable. Please try again shortly.",
}
_HOP_BY_HOP = {"host", "connection", "keep-alive", "content-length", "transfer-encoding"}
_STATE_FILTERS = {"instance-state-name", "instance-state-code"}
_FILTER_KEY = re.compile(r"^Filter\.(\d+)\.(.+)$")


def free_port_for_all(n: int) -> int:
    """A TCP port that is free on each of 127.0.1.2 .. 127.0.1.(n+1), the addresses instances get."""
    return free_port_on(f"{_PREFIX}{i}" for i in range(2, n + 2))


@dataclass(frozen=True)
class _Failure:
    status: int
    code: str
    message: str | None = None


@dataclass(frozen=True)
class _Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def _error(failure: _Failure) -> _Reply:
    """EC2's error shape: `<Response><Errors><Error>`, not the `<ErrorResponse>` of other Query APIs."""
    request_id = str(uuid.uuid4())
    message = failure.message or _MESSAGES.get(failure.code, f"Injected {failure.code}.")
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{escape(failure.code)}</Code><Message>{escape(message)}</Message>"
        f"</Error></Errors><RequestID>{request_id}</RequestID></Response>"
    )
    headers = [
        (b"content-type", b"text/xml;charset=UTF-8"),
        (b"x-amzn-requestid", request_id.encode()),
        (b"date", formatdate(usegmt=True).encode()),
        (b"server", b"AmazonEC2"),
    ]
    return _Reply(failure.status, headers, body.encode())


@dataclass(frozen=True)
class _Call:
    """One Query API request: its form fields (body, then URL query) in order."""

    params: list[tuple[str, str]]

    @classmethod
    def parse(cls, query: str, body: bytes) -> _Call:
        form = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        return cls(form + parse_qsl(query, keep_blank_values=True))

    def get(self, key: str, default: str = "") -> str:
        return next((v for k, v in self.params if k == key), default)

    @property
    def action(self) -> str:
        return self.get("Action")

    def instance_ids(self) -> list[str]:
        return [v for k, v in self.params if k.startswith("InstanceId.")]

    def flag(self, key: str) -> bool:
        return self.get(key).lower() == "true"


def _split_state_filters(call: _Call) -> tuple[bytes | None, dict[str, set[str]]]:
    """Take the instance-state filters out of a describe call, for the proxy to apply after rewriting.

    moto filters on its own (instant) states, so `instance-state-name=pending` would never match.
    Returns the new form body (None when there was nothing to take out) and the wanted values by name.
    """
    groups: dict[str, list[tuple[str, str]]] = {}
    rest: list[tuple[str, str]] = []
    for key, value in call.params:
        match = _FILTER_KEY.match(key)
        if match is None:
            rest.append((key, value))
        else:
            groups.setdefault(match[1], []).append((match[2], value))
    wanted: dict[str, set[str]] = {}
    kept = 0
    for fields in groups.values():
        name = next((v for k, v in fields if k == "Name"), "")
        if name in _STATE_FILTERS:
            wanted.setdefault(name, set()).update(v for k, v in fields if k.startswith("Value."))
        else:
            kept += 1  # the Query API reads Filter.1, Filter.2, … and stops at the first gap
            rest.extend((f"Filter.{kept}.{k}", v) for k, v in fields)
    return (urlencode(rest).encode() if wanted else None), wanted


# -- XML rewriting ----------------------------------------------------------------------------------


class _Xml:
    """A parsed EC2 response; `body()` re-serialises it only if something was changed."""

    def __init__(self, content: bytes) -> None:
        self.content = content
        self.root = ET.fromstring(content)
        self.ns = self.root.tag[1:].partition("}")[0] if self.root.tag.startswith("{") else ""
        self.changed = False

    def q(self, path: str) -> str:
        """An ElementTree path in the response's namespace (moto's lacks the trailing slash AWS has)."""
        return "/".join(f"{{{self.ns}}}{part}" if self.ns else part for part in path.split("/"))

    def text(self, element: ET.Element, path: str) -> str:
        return element.findtext(self.q(path)) or ""

    def set_text(self, element: ET.Element, path: str, text: str) -> None:
        target = element.find(self.q(path))
        if target is not None and target.text != text:
            target.text, self.changed = text, True

    def set_state(self, element: ET.Element, path: str, state: str) -> None:
        self.set_text(element, f"{path}/code", str(_CODES[state]))
        self.set_text(element, f"{path}/name", state)

    def remove(self, parent: ET.Element | None, child: ET.Element) -> None:
        if parent is not None:
            parent.remove(child)
            self.changed = True

    def body(self) -> bytes:
        if not self.changed:
            return self.content
        # Keep moto's own XML declaration; ElementTree's would differ in quotes and case.
        prolog = re.match(rb"\s*(<\?xml[^>]*\?>\s*)?", self.content)
        head = prolog[0] if prolog else b""
        return head + ET.tostring(self.root, encoding="unicode", default_namespace=self.ns or None).encode()


def _wanted(state: str, wanted: Mapping[str, set[str]]) -> bool:
    names, codes = wanted.get("instance-state-name"), wanted.get("instance-state-code")
    return (names is None or state in names) and (codes is None or str(_CODES[state]) in codes)


@dataclass(eq=False)
class _Instance(SimMachine):
    name: str
    iid: str
    ip: str
    truth: str  # moto's state, "running" or "stopped"
    overlay: str | None = None  # "pending" or "stopping" while the proxy's transition runs
    next_start: _Failure | None = None
    hang_next_start: bool = False
    stop_failures: list[_Failure] = field(default_factory=list)

    @property
    def state(self) -> str:
        return self.overlay or self.truth


class FakeEC2(MachineCloud[_Instance]):
    """moto's EC2 with realistic stop/start timing; see the module docstring. Use as ``async with``."""

    def __init__(
        self,
        *,
        boot_seconds: float = 0.2,
        stop_seconds: float = 0.1,
        region: str = "eu-west-1",
        ollama_port: int | None = None,
        session: boto3.session.Session | None = None,
    ) -> None:
        """``session``: a boto3 session to make the fake's own client from. Sharing one across fakes saves
        ~0.15 s each (botocore's EC2 model is parsed once per session); don't use it from another thread
        while the fake starts."""
        super().__init__()
        self.boot_seconds, self.stop_seconds, self.region = boot_seconds, stop_seconds, region
        self._session = session
        self.ollama_port = ollama_port if ollama_port is not None else free_port_for_all(_SPARE_ADDRESSES)
        self.account_id = f"{uuid.uuid4().int % 10**12:012d}"
        self.credentials = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": region,
        }
        self.calls: list[tuple[str, str]] = []
        self.hibernate_requests: list[bool] = []
        self.sims: dict[str, SimOllama] = {}
        self._instances: dict[str, _Instance] = {}
        self._by_id: dict[str, _Instance] = {}
        self._failures: list[_Failure] = []
        self._delay = 0.0
        self._lock = anyio.Lock()
        self._stack = AsyncExitStack()
        self._server: SimServer | None = None
        self._moto: ThreadedMotoServer | None = None
        self._admin: Any = None  # a boto3 EC2 client straight to moto, for setup and the console
        self._http: httpx.AsyncClient | None = None
        self._subnet = ""

    # -- lifetime -------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeEC2:
        async with AsyncExitStack() as stack:
            self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            await anyio.to_thread.run_sync(self._moto.start)
            stack.push_async_callback(self._stop_moto, self._moto)
            self._admin = await anyio.to_thread.run_sync(self._admin_client)
            stack.callback(self._admin.close)
            # The first EC2 call in a process takes about a second (moto loads its EC2 backend).
            await anyio.to_thread.run_sync(self._create_network)
            self._http = await stack.enter_async_context(httpx.AsyncClient(trust_env=False, timeout=30))
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            # moto's own Server and Date headers pass through, so uvicorn must not add its own.
            self._server = await stack.enter_async_context(
                running_server(
                    self._asgi,
                    host="127.0.0.1",
                    port=0,
                    interface="asgi3",
                    timeout_graceful_shutdown=1,
                    server_header=False,
                    date_header=False,
                )
            )
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self._close_machines(self._instances.values())  # `_closing` also cuts short the sleeps of slow_requests
        return await self._stack.__aexit__(exc_type, exc, tb)

    async def _stop_moto(self, moto: ThreadedMotoServer) -> None:
        """Stop moto's werkzeug server without its half-second wait.

        `serve_forever` checks for shutdown only between `select()` calls of 0.5 s; a new connection
        ends the select at once, so connect until the stopping thread is done.
        """
        host, port = moto.get_host_and_port()
        done = anyio.Event()

        async def stop() -> None:
            await anyio.to_thread.run_sync(moto.stop)
            done.set()

        with anyio.move_on_after(10, shield=True):
            async with anyio.create_task_group() as tg:
                tg.start_soon(stop)
                while not done.is_set():
                    with suppress(OSError):
                        await (await anyio.connect_tcp(host, port)).aclose()
                    with anyio.move_on_after(0.01):
                        await done.wait()

    @property
    def endpoint_url(self) -> str:
        """The proxy: what the EC2 client under test must use as its ``endpoint_url``."""
        assert self._server is not None, "use it as `async with FakeEC2() as fake`"
        return self._server.url

    @property
    def moto_url(self) -> str:
        assert self._moto is not None, "use it as `async with FakeEC2() as fake`"
        host, port = self._moto.get_host_and_port()
        return f"http://{host}:{port}"

    # -- moto, through the fake's own client ---------------------------------------------------------

    def _admin_client(self) -> Any:
        session = self._session or boto3.session.Session()
        client = session.client(
            "ec2",
            endpoint_url=self.moto_url,
            region_name=self.region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        client.meta.events.register("before-send.ec2", self._add_account)
        return client

    def _add_account(self, request: Any, **_: Any) -> None:
        request.headers["x-moto-account-id"] = self.account_id

    def _create_network(self) -> None:
        vpc = self._admin.create_vpc(CidrBlock=_VPC_CIDR)["Vpc"]["VpcId"]
        self._subnet = self._admin.create_subnet(VpcId=vpc, CidrBlock=_SUBNET_CIDR)["Subnet"]["SubnetId"]

    def _run_instance(
        self, ip: str, tags: Mapping[str, str], instance_type: str, running: bool, public_ip: bool = False
    ) -> str:
        tag_list = [{"Key": k, "Value": v} for k, v in tags.items()]
        # An auto-assigned public IP is released on stop and replaced on start, as on AWS.
        network: dict[str, Any] = (
            {
                "NetworkInterfaces": [
                    {
                        "DeviceIndex": 0,
                        "SubnetId": self._subnet,
                        "PrivateIpAddress": ip,
                        "AssociatePublicIpAddress": True,
                    }
                ]
            }
            if public_ip
            else {"SubnetId": self._subnet, "PrivateIpAddress": ip}
        )
        reply = self._admin.run_instances(
            ImageId=_AMI,
            MinCount=1,
            MaxCount=1,
            InstanceType=instance_type,
            TagSpecifications=[{"ResourceType": "instance", "Tags": tag_list}],
            **network,
        )
        iid: str = reply["Instances"][0]["InstanceId"]
        if not running:
            self._admin.stop_instances(InstanceIds=[iid])
        return iid

    def _moto_set(self, iid: str, running: bool) -> None:
        if running:
            self._admin.start_instances(InstanceIds=[iid])
        else:
            self._admin.stop_instances(InstanceIds=[iid])

    # -- instances --------------------------------------------------------------------------------

    def add_instance(
        self,
        name: str,
        *,
        running: bool = False,
        models: Iterable[str] = ("llama3.2:latest",),
        slots: int = 4,
        token_delay: float = 0.0,
        tags: Mapping[str, str] | None = None,
        instance_type: str = "g5.xlarge",
        public_ip: bool = False,
        **sim_options: Any,
    ) -> str:
        """Launch an instance tagged ``Name=name`` (plus ``tags``) in moto and return its id.

        It calls moto synchronously, blocking the event loop for a few milliseconds; moto runs in its
        own thread, so this cannot deadlock. A running instance's sim starts in the background:
        ``await fake.wait_for(name, "running", serving=True)`` before relying on it.
        """
        if self._tg is None:
            raise RuntimeError("add instances inside `async with FakeEC2() as fake`")
        if name in self._instances:
            raise ValueError(f"instance {name!r} exists already")
        ip = f"{_PREFIX}{len(self._instances) + 2}"
        iid = self._run_instance(ip, {"Name": name, **(tags or {})}, instance_type, running, public_ip)
        sim = SimOllama(name=name, models=models, slots=slots, token_delay=token_delay, **sim_options)
        instance = _Instance(name, iid, ip, "running" if running else "stopped", sim=sim)
        self._instances[name], self._by_id[iid], self.sims[name] = instance, instance, sim
        if running:
            self._start_sim_soon(instance)
        return iid

    def instance_id(self, name: str) -> str:
        return self._instances[name].iid

    def private_ip(self, name: str) -> str:
        return self._instances[name].ip

    def ollama_url(self, name: str) -> str:
        return f"http://{self._instances[name].ip}:{self.ollama_port}"

    def state(self, name: str) -> str:
        """The state DescribeInstances reports now: pending, running, stopping or stopped."""
        return self._instances[name].state

    def is_serving(self, name: str) -> bool:
        return self._instances[name].power.up

    async def wait_for(
        self,
        name: str,
        state: str,
        *,
        serving: bool | None = None,
        timeout: float = 5.0,
    ) -> None:
        """Wait until the instance reports ``state`` (and its sim is up or down, if ``serving`` says)."""
        instance = self._instances[name]
        with anyio.fail_after(timeout):
            await until(lambda: instance.state == state and (serving is None or instance.power.up == serving))

    # -- failure knobs and the console ----------------------------------------------------------------

    def fail_next_start(
        self, name: str, code: str = "InsufficientInstanceCapacity", status: int = 500, message: str | None = None
    ) -> None:
        """The next StartInstances naming it is refused (EC2 sends capacity errors as HTTP 500)."""
        instance = self._instances[name]
        instance.next_start, instance.hang_next_start = _Failure(status, code, message), False

    def hang_next_start(self, name: str) -> None:
        """The next start is accepted but stays `pending` until a stop or `set_running`."""
        instance = self._instances[name]
        instance.next_start, instance.hang_next_start = None, True

    def fail_stops(self, name: str, times: int = 1, status: int = 500, code: str = "InternalError") -> None:
        self._instances[name].stop_failures.extend([_Failure(status, code)] * times)

    def fail_requests(self, times: int = 1, status: int = 503, code: str | None = None) -> None:
        """The next ``times`` requests of any action get an EC2 error (Unavailable for 503)."""
        self._failures.extend([_Failure(status, code or _DEFAULT_CODES.get(status, "InternalError"))] * times)

    def slow_requests(self, seconds: float) -> None:
        self._delay = seconds

    async def set_running(self, name: str, running: bool) -> None:
        """Start or stop the instance at once, as from the AWS console: straight in moto, not in `calls`.

        Any transition in progress ends; returns once the sim is up or down.
        """
        instance = self._instances[name]
        async with self._lock:
            self._interrupt(instance)
            await anyio.to_thread.run_sync(self._moto_set, instance.iid, running)
            instance.truth, instance.overlay = ("running" if running else "stopped"), None
        if running:
            await self._ensure_sim(instance)
        else:
            self._stop_sim(instance)

    # -- the proxy ---------------------------------------------------------------------------------

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        reply = await self._answer(scope, body)
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [*reply.headers, (b"content-length", str(len(reply.body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": reply.body})

    async def _answer(self, scope: Scope, body: bytes) -> _Reply:
        call = _Call.parse(scope["query_string"].decode("latin-1"), body)
        self._record(call)
        if self._delay > 0:
            with anyio.move_on_after(self._delay):
                await self._closing.wait()
        if self._failures:
            return _error(self._failures.pop(0))
        async with self._lock:
            if call.action == "StartInstances":
                return await self._start(scope, body, call)
            if call.action == "StopInstances":
                return await self._stop(scope, body, call)
            if call.action in ("DescribeInstances", "DescribeInstanceStatus"):
                return await self._describe(scope, body, call)
            return await self._forward(scope, body)

    def _record(self, call: _Call) -> None:
        action = {"StartInstances": "start", "StopInstances": "stop"}.get(call.action)
        if action is None:
            return
        for iid in call.instance_ids():
            instance = self._by_id.get(iid)
            self.calls.append((action, instance.name if instance else iid))
        if action == "stop":
            self.hibernate_requests.append(call.flag("Hibernate"))

    async def _forward(self, scope: Scope, body: bytes) -> _Reply:
        assert self._http is not None
        headers = [(k, v) for k, v in scope["headers"] if k.decode("latin-1").lower() not in _HOP_BY_HOP]
        headers.append((b"x-moto-account-id", self.account_id.encode()))
        query = scope["query_string"].decode("latin-1")
        url = self.moto_url + scope["path"] + (f"?{query}" if query else "")
        response = await self._http.request(scope["method"], url, headers=headers, content=body)
        kept = [(k, v) for k, v in response.headers.raw if k.decode("latin-1").lower() not in _HOP_BY_HOP]
        return _Reply(response.status_code, kept, response.content)

    def _known(self, call: _Call) -> list[_Instance]:
        return [self._by_id[iid] for iid in call.instance_ids() if iid in self._by_id]

    async def _start(self, scope: Scope, body: bytes, call: _Call) -> _Reply:
        instances = self._known(call)
        stopping = next((i for i in instances if i.state == "stopping"), None)
        if stopping is not None:
            return _error(
                _Failure(
                    400,
                    "IncorrectInstanceState",
                    f"The instance '{stopping.iid}' is not in a state from which it can be started.",
                )
            )
        for instance in instances:
            if instance.next_start is not None:  # refused before moto sees it: the instance stays stopped
                failure, instance.next_start = instance.next_start, None
                return _error(failure)
        before = {i.iid: i.state for i in instances}
        reply = await self._forward(scope, body)
        if reply.status == 200:
            for instance in instances:
                if instance.state == "stopped":
                    self._boot(instance)
        return self._rewrite_changes(reply, before)

    async def _stop(self, scope: Scope, body: bytes, call: _Call) -> _Reply:
        instances = self._known(call)
        refused = next((i for i in instances if i.stop_failures), None)
        if refused is not None:
            return _error(refused.stop_failures.pop(0))
        before = {i.iid: i.state for i in instances}
        reply = await self._forward(scope, body)
        if reply.status == 200:
            for instance in instances:
                if instance.state in ("pending", "running"):
                    self._halt(instance)
        return self._rewrite_changes(reply, before)

    async def _describe(self, scope: Scope, body: bytes, call: _Call) -> _Reply:
        stripped, wanted = _split_state_filters(call)
        reply = await self._forward(scope, body if stripped is None else stripped)
        if reply.status != 200:
            return reply
        xml = _Xml(reply.body)
        if call.action == "DescribeInstances":
            self._rewrite_reservations(xml, wanted)
        else:
            self._rewrite_statuses(xml, wanted, call.flag("IncludeAllInstances"))
        return _Reply(reply.status, reply.headers, xml.body())

    # -- rewriting moto's answers --------------------------------------------------------------------

    def _rewrite_reservations(self, xml: _Xml, wanted: Mapping[str, set[str]]) -> None:
        reservations = xml.root.find(xml.q("reservationSet"))
        for reservation in list(reservations if reservations is not None else ()):
            instances = reservation.find(xml.q("instancesSet"))
            for item in list(instances if instances is not None else ()):
                state = self._reported(xml.text(item, "instanceId"), xml.text(item, "instanceState/name"))
                xml.set_state(item, "instanceState", state)
                if not _wanted(state, wanted):
                    xml.remove(instances, item)
            if not reservation.findall(xml.q("instancesSet/item")):
                xml.remove(reservations, reservation)

    def _rewrite_statuses(self, xml: _Xml, wanted: Mapping[str, set[str]], include_all: bool) -> None:
        statuses = xml.root.find(xml.q("instanceStatusSet"))
        for item in list(statuses if statuses is not None else ()):
            iid = xml.text(item, "instanceId")
            state = self._reported(iid, xml.text(item, "instanceState/name"))
            xml.set_state(item, "instanceState", state)
            if state != "running" and iid in self._by_id:  # checks run only once an instance is running
                xml.set_text(item, "systemStatus/status", "not-applicable")
                xml.set_text(item, "instanceStatus/status", "not-applicable")
            if not _wanted(state, wanted) or (state != "running" and not include_all):
                xml.remove(statuses, item)  # by default AWS lists running instances only

    def _rewrite_changes(self, reply: _Reply, before: Mapping[str, str]) -> _Reply:
        """Start/StopInstances answers: the states before and after as the fake reports them."""
        if reply.status != 200:
            return reply
        xml = _Xml(reply.body)
        for item in xml.root.iterfind(xml.q("instancesSet/item")):
            iid = xml.text(item, "instanceId")
            if iid in before:
                xml.set_state(item, "previousState", before[iid])
                xml.set_state(item, "currentState", self._by_id[iid].state)
        return _Reply(reply.status, reply.headers, xml.body())

    def _reported(self, iid: str, moto_state: str) -> str:
        instance = self._by_id.get(iid)
        return instance.state if instance is not None else moto_state

    # -- transitions ----------------------------------------------------------------------------

    def _boot(self, instance: _Instance) -> None:
        instance.truth, instance.overlay = "running", "pending"
        hang, instance.hang_next_start = instance.hang_next_start, False
        self._launch(instance, partial(self._booting, instance, hang))

    async def _booting(self, instance: _Instance, hang: bool) -> None:
        if hang:
            await anyio.sleep_forever()  # like a start waiting for a host; ends by a stop or set_running
        await anyio.sleep(self.boot_seconds)
        await self._ensure_sim(instance)  # before `running`, so a client that sees it finds Ollama
        await anyio.lowlevel.checkpoint_if_cancelled()  # an interruption during the shielded start wins
        instance.overlay = None

    def _halt(self, instance: _Instance) -> None:
        instance.truth, instance.overlay = "stopped", "stopping"
        self._launch(instance, partial(self._stopping, instance))

    async def _stopping(self, instance: _Instance) -> None:
        await anyio.sleep(self.stop_seconds)
        self._stop_sim(instance)
        instance.overlay = None

    def _sim_address(self, instance: _Instance) -> tuple[str, int]:
        return instance.ip, self.ollama_port
