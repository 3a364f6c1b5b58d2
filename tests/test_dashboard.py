"""The dashboard in a real headless Chromium (Debian's `chromium` and `chromium-driver`), driven by
Selenium, in front of gpumanager with a simulated cloud. Each test saves a screenshot in its
temporary folder.
"""

from __future__ import annotations

import contextlib
import http.server
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from anyio.from_thread import start_blocking_portal
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from starlette.responses import PlainTextResponse

from gpumanager.app import build_app
from gpumanager.config import load
from gpumanager.hosts import HostState
from gpumanager.keys import KeyStore
from gpumanager.sessions import COOKIE, Sessions
from gpumanager.sim import SimOllama, running_server
from tests.harness import SimHost, Stack, _serve, write_config
from tests.test_gpu_node import DCGM_CONTENT_TYPE, DCGM_TEXT

CHROMEDRIVER = "/usr/bin/chromedriver"
DEADLINE = 5.0  # what the page may take to show a change of the fleet

CONFIG = """
[metrics]
gpu_scrape_seconds = 0.1

[timing]
reservation_minutes = 0.05
fallback_reservation_minutes = 0.05
ollama_readiness_wait_seconds = 0.05
reconcile_interval_seconds = 1
wake_keepalive_seconds = 1
shutdown_grace_seconds = 1

[[providers]]
type = "simulated"
name = "lab"

[[providers.hosts]]
name = "gpu-a"
models = ["llama3.2:latest"]
cost_per_hour = 1.2
boot_seconds = 1
pause_seconds = 0.5
token_delay_seconds = 0.02

[[providers.hosts]]
name = "gpu-b"
models = ["qwen2.5:7b"]
cost_per_hour = 2.5
boot_seconds = 1
pause_seconds = 0.5
token_delay_seconds = 0.02
"""


def until(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Wait for a condition; an element the page replaced meanwhile (a navigation, a re-render) is
    looked for again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or check}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    assert Path(CHROMEDRIVER).exists() and shutil.which("chromium"), (
        "the dashboard tests need Debian's chromium and chromium-driver: "
        "sudo apt-get install -y --no-install-recommends chromium chromium-driver"
    )
    options = Options()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--window-size=1280,900", "--disable-gpu"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for its errors
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """gpumanager with two simulated cloud hosts, and a static host whose door also serves its GPUs'
    metrics (dcgm-exporter's text)."""
    sim = SimOllama(name="box", models=["tiny:latest"], slots=2)

    async def box(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/gpu-metrics":
            await PlainTextResponse(DCGM_TEXT, media_type=DCGM_CONTENT_TYPE)(scope, receive, send)
        else:
            await sim(scope, receive, send)

    with start_blocking_portal() as portal, contextlib.ExitStack() as exits:
        server = exits.enter_context(portal.wrap_async_context_manager(running_server(box)))
        config_path = write_config(tmp_path, [("box", server.url, SimHost("box", models=("tiny:latest",)))], CONFIG)
        running = _serve(portal, exits, config_path, {}, {}, {})
        until(lambda: len(running.runtime.fleet.hosts) == 3, what="the hosts")
        yield running


@pytest.fixture
def page(browser: WebDriver, stack: Stack, tmp_path: Path) -> Iterator[WebDriver]:
    browser.delete_all_cookies()
    yield browser
    browser.save_screenshot(str(tmp_path / "screenshot.png"))
    with contextlib.suppress(Exception):
        browser.get("about:blank")  # the page's stream ends before its server does


def log_in(page: WebDriver, stack: Stack, key: str) -> None:
    page.get(stack.url + "/dashboard")
    field = until(lambda: _visible(page, "input[name=key]"), what="the login form")
    field.send_keys(key)
    page.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    until(lambda: text(page, "#live") == "live", what="the page's live stream")


def _visible(page: WebDriver, selector: str) -> Any:
    found = page.find_elements(By.CSS_SELECTOR, selector)
    return found[0] if found and found[0].is_displayed() else None


def text(page: WebDriver, selector: str) -> str:
    """The text of an element the page may re-render at any moment (read in one go, never stale)."""
    return str(page.execute_script("return document.querySelector(arguments[0])?.innerText ?? ''", selector))


def shown_state(page: WebDriver, host: str) -> str:
    return str(
        page.execute_script(f"return document.querySelector('tr[data-host=\"{host}\"] .state')?.dataset.state ?? ''")
    )


def watch_states(page: WebDriver, host: str, end: str, timeout: float = 20.0) -> list[tuple[float, str]]:
    """Every state the page shows for `host`, with the wall time it was first seen, up to `end`."""
    seen: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = shown_state(page, host)
        if state and (not seen or seen[-1][1] != state):
            seen.append((time.time(), state))
        if state == end:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"{host} went through {[s for _, s in seen]} and not to {end}")


def published(stack: Stack, host: str, state: str) -> float:
    """When gpumanager published `host`'s move to `state` (the event's own time)."""
    found = [
        e.time
        for e in stack.runtime.events.history(["host_state"])
        if f'"host":"{host}"'.encode() in e.data and f'"new":"{state}"'.encode() in e.data
    ]
    assert found, f"no host_state event of {host} to {state}"
    return found[-1]


def in_background(fn: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def chat(stack: Stack, key: str, model: str = "llama3.2", tokens: int = 8) -> str:
    with openai.OpenAI(base_url=stack.v1, api_key=key, max_retries=0, timeout=30) as client:
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=tokens
        )
    return answer.choices[0].message.content or ""


# -- the admin's view --------------------------------------------------------------------------------


def test_the_admin_sees_a_wake_then_a_drain_and_a_pause(page: WebDriver, stack: Stack, tmp_path: Path) -> None:
    log_in(page, stack, stack.admin_key)
    assert shown_state(page, "gpu-a") == "paused"
    assert page.find_element(By.ID, "admin").is_displayed() and not page.find_element(By.ID, "user").is_displayed()
    # The static host's GPUs, scraped through its door, as dcgm-exporter reports them.
    box = until(lambda: "GPU 1" in (row := text(page, 'tr[data-host="box"]')) and row, what="box's GPU metrics")
    assert "61 °C" in box and "312 W" in box and "always on" in box

    answers: list[str] = []
    request = in_background(lambda: answers.append(chat(stack, stack.user_key)))
    seen = watch_states(page, "gpu-a", "ready")
    request.join(30)
    assert answers and answers[0]
    states = [s for _, s in seen]
    assert states[0] == "paused" and states[-1] == "ready"
    assert any(s in ("resuming", "starting") for s in states), states  # waking, then ready: in that order
    waking_seen = next(t for t, s in seen if s in ("resuming", "starting"))
    ready_seen = next(t for t, s in seen if s == "ready")
    waking_latency = waking_seen - published(stack, "gpu-a", "resuming")
    ready_latency = ready_seen - published(stack, "gpu-a", "ready")
    measured = f"waking shown {waking_latency * 1000:.0f} ms, ready {ready_latency * 1000:.0f} ms after the event"
    (tmp_path / "latency.txt").write_text(measured + "\n")
    print("page latency:", measured)
    assert waking_latency < DEADLINE and ready_latency < DEADLINE

    # The request appears among the last requests, and the wake with its phases.
    until(lambda: "llama3.2" in text(page, "#requests"), what="the request in the table")
    assert "gpu-a" in text(page, "#wakes")

    # A long stream holds the host; Pause drains it (the stream finishes), then pauses it.
    done: list[str] = []
    stream = in_background(lambda: done.append(chat(stack, stack.user_key, tokens=300)))
    until(lambda: stack.call(lambda: stack.runtime.fleet.hosts["gpu-a"].leases) == 1, what="the stream's slot")
    page.find_element(By.CSS_SELECTOR, 'tr[data-host="gpu-a"] button[data-action="pause"]').click()
    alert = page.switch_to.alert
    assert "Pause gpu-a?" in alert.text
    alert.accept()
    seen = watch_states(page, "gpu-a", "paused")
    stream.join(30)
    assert done and done[0]  # the drain let it finish
    states = [s for _, s in seen]
    assert "draining" in states and states.index("draining") < states.index("paused"), states
    assert stack.runtime.fleet.hosts["gpu-a"].state is HostState.PAUSED
    # The page ran under its strict Content-Security-Policy without a single error.
    # (The 401 of its first look, before the login, is a network entry, not an error of the page.)
    errors = [e["message"] for e in page.get_log("browser") if e["level"] == "SEVERE" and e["source"] != "network"]
    assert not errors, errors


def test_emergency_off_asks_first_then_shows_every_host_pausing(page: WebDriver, stack: Stack) -> None:
    for host in ("gpu-a", "gpu-b"):
        resumed = httpx.post(f"{stack.url}/gpu/{host}/resume", headers=stack.headers(stack.admin_key), timeout=10)
        assert resumed.status_code == 202
    until(lambda: all(h.state is HostState.READY for h in stack.runtime.fleet.hosts.values()), what="both awake")
    log_in(page, stack, stack.admin_key)
    until(lambda: shown_state(page, "gpu-a") == shown_state(page, "gpu-b") == "ready", what="both shown ready")

    button = page.find_element(By.ID, "emergency-off")
    button.click()
    alert = page.switch_to.alert
    assert "pause EVERY host" in alert.text
    alert.dismiss()  # asked, and said no: nothing happens
    time.sleep(0.3)  # (a change would show within this time; none may come)
    assert shown_state(page, "gpu-a") == shown_state(page, "gpu-b") == "ready"
    assert not stack.runtime.fleet.emergency

    button.click()
    page.switch_to.alert.accept()
    pausing = {"pausing", "paused"}
    until(
        lambda: shown_state(page, "gpu-a") in pausing and shown_state(page, "gpu-b") in pausing,
        timeout=DEADLINE,
        what="every host pausing",
    )
    until(lambda: "EMERGENCY OFF" in text(page, "#emergency-state"), timeout=DEADLINE)
    assert stack.runtime.fleet.emergency
    until(lambda: _visible(page, "#emergency-on"), timeout=DEADLINE, what="the button to turn it back on")
    with contextlib.suppress(NoAlertPresentException):
        page.switch_to.alert.dismiss()


# -- a user's view -------------------------------------------------------------------------------------


def test_a_user_sees_only_their_own_usage_and_no_buttons(page: WebDriver, stack: Stack) -> None:
    admin = stack.headers(stack.admin_key)
    assert httpx.post(f"{stack.url}/gpu/gpu-a/protect", headers=admin, timeout=10).status_code == 200
    assert chat(stack, stack.user_key)  # wakes gpu-a (protected: it stays awake): the user's own request
    other = stack.keys.generate("other", "other@example.org")[1]
    assert chat(stack, other)
    log_in(page, stack, stack.user_key)
    until(lambda: "awake" in text(page, 'tr[data-model="llama3.2:latest"]'), what="llama3.2's host awake")
    assert page.find_element(By.ID, "user").is_displayed()
    assert not page.find_element(By.ID, "admin").is_displayed()
    assert not page.find_elements(By.CSS_SELECTOR, "button[data-action]")
    assert not _visible(page, "#emergency-off")
    models = text(page, "#models")
    assert "llama3.2:latest" in models and "qwen2.5:7b" in models
    assert "asleep" in text(page, 'tr[data-model="qwen2.5:7b"]')
    # Unprotected, gpu-a sleeps again after its window, and the page says so.
    assert httpx.delete(f"{stack.url}/gpu/gpu-a/protect", headers=admin, timeout=10).status_code == 200
    until(lambda: "asleep" in text(page, 'tr[data-model="llama3.2:latest"]'), what="llama3.2's host asleep again")
    until(lambda: _cell(page, "usage", "Requests today") == "1", what="the user's one request")  # not the other's
    # The session is a user's: the admin API refuses it, and the page's state has no fleet in it.
    state = page.execute_script("return fetch('/dashboard/api/state').then(r => r.json())")
    assert "hosts" not in state and state["me"]["admin"] is False
    status = page.execute_script("return fetch('/gpu/discover').then(r => r.status)")
    assert status == 403


def _cell(page: WebDriver, table: str, label: str) -> str:
    for row in page.find_elements(By.CSS_SELECTOR, f"#{table} tr"):
        cells = row.find_elements(By.CSS_SELECTOR, "th, td")
        if len(cells) == 2 and cells[0].text == label:
            return str(cells[1].text)
    return ""


def test_a_revoked_keys_session_is_refused_at_once(page: WebDriver, stack: Stack) -> None:
    record, key = stack.keys.generate("leaver", "leaver@example.org")
    log_in(page, stack, key)
    cookie = page.get_cookie(COOKIE)
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.execute_script("return document.cookie") == ""  # the session is out of JavaScript's reach
    stack.keys.revoke(record.id)
    revoked = time.monotonic()
    until(lambda: _visible(page, "#login"), timeout=DEADLINE, what="the page to ask for a login again")
    print(f"session refused {time.monotonic() - revoked:.2f} s after the revocation")
    assert "session has ended" in text(page, "#login-message")
    again = httpx.get(f"{stack.url}/dashboard/api/state", cookies={COOKIE: cookie["value"]}, timeout=10)
    assert again.status_code == 401


def test_a_state_changing_request_from_another_origin_is_refused(page: WebDriver, stack: Stack) -> None:
    log_in(page, stack, stack.admin_key)
    session = page.get_cookie(COOKIE)
    assert session is not None
    # Another local port is "same-site" to a cookie (cookies ignore ports): only the Origin check stops it.
    with _other_site(
        f"""<link rel="icon" href="data:,"><script>
        fetch("{stack.url}/gpu/emergency-off", {{method: "POST", credentials: "include"}})
        .then(r => document.title = "sent " + r.status, e => document.title = "sent " + e);</script>"""
    ) as evil:
        page.get(evil)
        until(lambda: page.title.startswith("sent"), what="the other site's request")
    assert not stack.runtime.fleet.emergency
    headers = {"origin": "http://127.0.0.1:1", "cookie": f"{COOKIE}={session['value']}"}
    refused = httpx.post(f"{stack.url}/gpu/gpu-a/resume", headers=headers, timeout=10)
    assert refused.status_code == 403 and "cross-origin" in refused.json()["error"]
    assert "access-control-allow-credentials" not in refused.headers
    login = httpx.post(f"{stack.url}/dashboard/login", headers={"origin": "http://evil.example"}, data={"key": "x"})
    assert login.status_code == 403
    # From the dashboard's own origin the same request goes through.
    own = httpx.post(f"{stack.url}/gpu/gpu-a/resume", headers={**headers, "origin": stack.url}, timeout=10)
    assert own.status_code == 202


@contextlib.contextmanager
def _other_site(html: str) -> Iterator[str]:
    """A page on another loopback port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True  # a browser's spare connection must not hold the shutdown

    with Server(("127.0.0.1", 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}/"
        finally:
            server.shutdown()


def test_login_failures_logout_and_one_time_links(page: WebDriver, stack: Stack) -> None:
    page.get(stack.url + "/dashboard")
    until(lambda: _visible(page, "input[name=key]")).send_keys("gm_not-a-key")
    page.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    until(lambda: "unknown or revoked" in text(page, "#login-message"))

    sessions: Sessions = stack.runtime.sessions
    admin = stack.keys.authenticate(stack.admin_key)
    assert admin is not None
    token = stack.call(lambda: sessions.link(admin.id))
    page.get(f"{stack.url}/dashboard/login/{token}")
    until(lambda: text(page, "#live") == "live", what="logged in by the link")
    cookie = page.get_cookie(COOKIE)
    assert cookie is not None
    page.get(f"{stack.url}/dashboard/login/{token}")  # spent: a second use logs nobody in
    page.delete_all_cookies()
    page.get(f"{stack.url}/dashboard/login/{token}")
    until(lambda: "used already or has expired" in text(page, "#login-message"))

    page.add_cookie({"name": COOKIE, "value": cookie["value"], "path": "/"})
    page.get(stack.url + "/dashboard")
    until(lambda: _visible(page, "#logout button"), what="the session's page").click()
    until(lambda: _visible(page, "#login"), what="logged out")
    after = httpx.get(f"{stack.url}/dashboard/api/state", cookies={COOKIE: cookie["value"]}, timeout=10)
    assert after.status_code == 401  # a copy of the cookie is no good after the logout


def test_the_page_reconnects_after_a_restart(browser: WebDriver, tmp_path: Path) -> None:
    """The session outlives the process (its secret is in state_dir): the page picks up the new one."""
    config_path = write_config(tmp_path, [], CONFIG.replace("[metrics]\ngpu_scrape_seconds = 0.1\n", ""))
    admin_key = KeyStore(load(config_path).paths.api_keys_file).generate("admin", "a@example.org", admin=True)[1]
    browser.delete_all_cookies()

    def serve(port: int = 0) -> contextlib.AbstractContextManager[Any]:
        app = build_app(load(config_path), environ={})
        return portal.wrap_async_context_manager(
            running_server(app, port=port, lifespan="on", timeout_graceful_shutdown=1)
        )

    with start_blocking_portal() as portal:
        with serve() as first:
            url, port = first.url, first.port
            browser.get(url + "/dashboard")
            until(lambda: _visible(browser, "input[name=key]")).send_keys(admin_key)
            browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
            until(lambda: text(browser, "#live") == "live", what="the page's stream")
        until(lambda: text(browser, "#live") != "live", what="the page to notice the server gone")
        with serve(port) as second:
            until(lambda: text(browser, "#live") == "live", timeout=15, what="the page back on the new server")
            resumed = httpx.post(f"{url}/gpu/gpu-a/resume", headers={"authorization": f"Bearer {admin_key}"})
            assert resumed.status_code == 202
            until(lambda: shown_state(browser, "gpu-a") == "ready", timeout=DEADLINE, what="live events again")
            assert second.port == port
            browser.save_screenshot(str(tmp_path / "screenshot.png"))
            browser.get("about:blank")
