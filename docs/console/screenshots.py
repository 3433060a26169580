#!/usr/bin/env python3
"""Screenshots of the admin console for README.md, taken from a running `falaj demo`.

    falaj demo --dir /tmp/demo > demo.log &      # wait for "Serving until Ctrl-C"
    python3 docs/console/screenshots.py demo.log

Reads the console's URL and the demo admin's password from the demo's output, drives
Debian's chromium through chromedriver (WebDriver over HTTP, standard library only) and
writes one PNG per page into this directory.
"""
import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
PAGES = [
    ("overview", "/"),
    ("fleet", "/fleet"),
    ("deployments", "/rollouts"),
    ("rollout", "/rollouts/demo/sensor-fault"),
    ("monitoring", "/monitoring?model=sensor-fault&since=15m"),
    ("models", "/models"),
    ("audit", "/audit"),
    ("users", "/users"),
]


def call(base, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["value"]


def main(log):
    text = open(log).read()
    m = re.search(r"console\s+(http://\S+)/\s+\(user (\S+), one-time password (\S+)\)", text)
    if not m:
        sys.exit("no console line in " + log)
    url, user, password = m.groups()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    driver = subprocess.Popen(["chromedriver", f"--port={port}"], stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen(base + "/status", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": {"args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"]}}}}
        session = call(base, "POST", "/session", caps)["sessionId"]
        s = f"/session/{session}"
        find = lambda css: call(base, "POST", s + "/element", {"using": "css selector", "value": css})
        element = lambda e: list(e.values())[0]
        call(base, "POST", s + "/url", {"url": url + "/login"})
        call(base, "POST", s + f"/element/{element(find('#user'))}/value", {"text": user})
        call(base, "POST", s + f"/element/{element(find('#password'))}/value", {"text": password})
        call(base, "POST", s + f"/element/{element(find('main.login button'))}/click", {})
        for name, path in PAGES:
            call(base, "POST", s + "/url", {"url": url + path})
            find("header.top")
            png = base64.b64decode(call(base, "GET", s + "/screenshot"))
            open(os.path.join(HERE, name + ".png"), "wb").write(png)
            print("wrote", name + ".png")
        call(base, "DELETE", s)
    finally:
        driver.terminate()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo.log")
