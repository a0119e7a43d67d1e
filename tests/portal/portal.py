#!/usr/bin/env python3
"""Drives the Tollgate portal in Debian's Chromium (headless) through Playwright, as a
customer's admins and viewers use it, against a running sidecar.

One scenario per run (the Rust test `portal_browser` starts a fresh sidecar for each):
  overview  sign in as acme's admin; usage made through the API moves the overview's bars and
            the usage chart without a reload; the tree pages, searches and collapses; CSV.
  alerts    an alert rule with a webhook made in the page; usage over its threshold; the test
            receiver gets a correctly signed call; the delivery log shows it.
  limits    lower a team limit in the page: the next decision over it is denied; raise one
            above its ceiling: refused, with the reason on the page.
  viewer    a viewer sees no controls, and a forged change is refused.
  tenancy   globex's admin gets 403 on acme's pages and API; a change without the CSRF token
            is refused.
  spend     the first screen in money: priced calls on two models; every figure equals the
            spend API's, by team and by model; denials by limit; a team drills down to the tree.
  tour      after real traffic through Envoy (made by the Rust test), as the admin, the
            viewer and the operator: the first screen's figures are the spend API's, the credit
            pool's counter is the spend, created users are in the tree.
  live      the live page follows usage made after it opened: paged (25 a page), "who" in the
            hierarchy's order, a denial with what it asked for, filters; the server restarts
            (the harness restarts it when this prints `restart`, then writes `restarted` on
            stdin): the page says the session ended and offers the sign-in, and after it
            follows usage again.

Prints one JSON object on success; any failed expectation raises (non-zero exit). Screenshots
go to --artifacts.
"""

import argparse
import base64
import hashlib
import hmac
import http.server
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request

from playwright.sync_api import expect, sync_playwright

TIMEOUT_MS = 15_000


def api(base, method, path, token=None, body=None, headers=None):
    """One call to the sidecar's HTTP API: (status, parsed JSON or text)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        status = e.code
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def spend(base, key, user, units):
    """Usage through the API, as an application makes it: a check, then a settle."""
    status, d = api(base, "POST", "/v1/customers/acme/entitlements/check", key,
                    {"featureId": "ai-tokens", "requestedUsage": units, "dimensions": {"userId": user}})
    assert status == 200, (status, d)
    if not d["isGranted"]:
        return d
    status, s = api(base, "POST", f"/v1/holds/{d['holdId']}/settle", key, {"actualUsage": units})
    assert status == 200, (status, s)
    return d


class Receiver(http.server.BaseHTTPRequestHandler):
    """A webhook receiver on loopback that keeps every call."""
    calls = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        Receiver.calls.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_):
        pass


def verify(secret, headers, body):
    """Checks a Standard Webhooks signature: HMAC-SHA256 over `id.timestamp.body` with the
    secret's bytes, one `v1,<base64>` per signing secret."""
    h = {k.lower(): v for k, v in headers.items()}
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.".encode() + body
    want = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    sigs = [s.split(",", 1)[1] for s in h["webhook-signature"].split() if s.startswith("v1,")]
    return any(hmac.compare_digest(want, s) for s in sigs)


def sign_in(page, portal, token):
    page.goto(f"{portal}/portal/login")
    page.get_by_label("Operator token or API key").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r".*/portal/(c/[^/]+/|customers)$"))


def shot(page, artifacts, name):
    if artifacts:
        os.makedirs(artifacts, exist_ok=True)
        page.screenshot(path=os.path.join(artifacts, f"{name}.png"), full_page=True)


def used_of(page, entity, limit):
    loc = page.locator(f'li[data-entity="{entity}"] > .bars > [data-limit="{limit}"] .used')
    return int(loc.inner_text())


def wait_for(predicate, what, timeout=TIMEOUT_MS / 1000):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def scenario_overview(page, a):
    sign_in(page, a.portal, a.admin)
    expect(page.locator('li[data-entity="acme"]')).to_be_visible()
    assert used_of(page, "acme", "org-daily") == 0
    # Expand the organization: its teams appear, with their bars.
    page.get_by_role("button", name=re.compile("Show the .* entities under acme")).click()
    expect(page.locator('li[data-entity="research"]')).to_be_visible()
    # Usage through the API moves the bars without a reload.
    marker = page.evaluate("() => (window.__marker = Math.random())")
    spend(a.api, a.app, "alice", 700)
    wait_for(lambda: used_of(page, "research", "team-daily") == 700, "the research bar to show 700")
    wait_for(lambda: used_of(page, "acme", "org-daily") == 700, "the org bar to show 700")
    assert page.evaluate("() => window.__marker") == marker, "the page reloaded"
    # Near the team's limit the row stands out.
    spend(a.api, a.app, "alice", 7500)
    expect(page.locator('li[data-entity="research"] [data-limit="team-daily"]')).to_have_class(re.compile("near"))
    expect(page.locator('li[data-entity="research"]')).to_have_class(re.compile("near"))
    shot(page, a.artifacts, "overview")
    # Collapse, then search across the tree.
    page.get_by_role("button", name=re.compile("Show the .* entities under acme")).click()
    expect(page.locator('li[data-entity="research"]')).to_have_count(0)
    page.get_by_label("Find an entity").fill("user-01")
    expect(page.locator('li[data-entity="user-010"]')).to_be_visible()
    # Paging: the big team lists 25 at a time.
    page.get_by_label("Find an entity").fill("")
    page.get_by_role("button", name=re.compile("Show the .* entities under acme")).click()
    page.get_by_role("button", name=re.compile("Show the 60 entities under crowd")).click()
    expect(page.locator('li[data-entity="crowd"] li[data-entity]')).to_have_count(25)
    page.get_by_role("button", name=re.compile(r"Show more \(25 of 60\)")).click()
    expect(page.locator('li[data-entity="crowd"] li[data-entity]')).to_have_count(50)

    # The usage explorer: the chart moves without a reload; the CSV is what it shows.
    page.get_by_role("link", name="Usage").click()
    page.get_by_label("Window").select_option("MINUTE")
    page.get_by_label("Range").select_option("3600")
    chart = page.locator("#chart")
    wait_for(lambda: chart.get_attribute("data-total") == "8200", "the chart to total 8200")
    spend(a.api, a.app, "bob", 300)
    wait_for(lambda: chart.get_attribute("data-total") == "8500", "the chart to total 8500")
    expect(page.locator("#chart canvas")).to_have_count(1)
    expect(page.locator("#top tbody tr").first).to_be_visible()
    shot(page, a.artifacts, "usage")
    with page.expect_download() as dl:
        page.get_by_role("link", name="Download CSV").click()
    csv = open(dl.value.path(), encoding="utf-8").read().splitlines()
    assert csv[0].startswith("windowStart,windowEnd,"), csv[0]
    total = sum(int(line.split(",")[-4]) for line in csv[1:])
    assert total == 8500, total
    # The live feed and the audit log render.
    page.get_by_role("link", name="Live").click()
    expect(page.locator("#live-status")).to_contain_text("Live")
    spend(a.api, a.app, "bob", 5)
    expect(page.locator("#live tbody tr").first).to_contain_text("bob")
    shot(page, a.artifacts, "live")
    return {"overview": "ok", "csvRows": len(csv) - 1}


def scenario_alerts(page, a):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{server.server_address[1]}/hook"
    sign_in(page, a.portal, a.admin)
    page.get_by_role("link", name="Alerts").click()
    page.get_by_label("Webhook id").fill("ops")
    page.get_by_label("Address (https://)").fill(hook)
    page.get_by_role("button", name="Add webhook").click()
    secret_box = page.locator("#secret-value")
    expect(secret_box).to_contain_text("whsec_")
    secret = secret_box.inner_text().strip()
    shot(page, a.artifacts, "alerts-secret")
    page.reload()
    # Shown once: not on the page any more.
    assert secret not in page.content()
    page.get_by_label("Rule id").fill("team-80")
    page.get_by_label("Entity type (every entity of it)").select_option("team")
    page.get_by_label("Fire at percent of the limit (comma separated)").fill("80")
    page.get_by_label("ops").check()
    page.get_by_role("button", name="Save rule").click()
    expect(page.locator('tr[data-rule="team-80"]')).to_be_visible()
    # Usage over 80 % of research's 10,000.
    spend(a.api, a.app, "alice", 8100)
    wait_for(lambda: any(b"limit.threshold" in body or b"team-80" in body for _, body in Receiver.calls),
             "the alert to reach the receiver")
    headers, body = next((h, b) for h, b in Receiver.calls if b"team-80" in b or b"threshold" in b)
    assert verify(secret, headers, body), "the alert's signature does not verify"
    forged = body.replace(b"research", b"sales")
    assert not verify(secret, headers, forged)
    expect(page.locator('#deliveries tbody tr[data-status="delivered"]').first).to_be_visible(timeout=TIMEOUT_MS)
    # A test delivery, then a rotation: the new secret signs the next call.
    page.get_by_role("button", name="Send a test").click()
    wait_for(lambda: any(b"webhook.test" in b for _, b in Receiver.calls), "the test delivery")
    page.get_by_role("button", name="Rotate secret").click()
    expect(secret_box).to_contain_text("whsec_")
    rotated = secret_box.inner_text().strip()
    assert rotated != secret
    page.reload()
    n = len(Receiver.calls)
    page.get_by_role("button", name="Send a test").click()
    wait_for(lambda: len(Receiver.calls) > n, "the test after rotation")
    h2, b2 = Receiver.calls[-1]
    assert verify(rotated, h2, b2), ("the new secret does not sign", h2)
    assert verify(secret, h2, b2), ("the previous secret no longer signs", h2)
    # A rule id that tries to break out of the Edit button's attribute: the page keeps it as
    # data (no attribute of its own appears), and Edit loads it whole.
    hostile = 'x"autofocus="autofocus"onfocus="document.title=1"y'
    status, body = api(a.api, "POST", "/v1/customers/acme/alerts", a.admin,
                       {"id": hostile, "entity": "acme", "limit": "org-daily", "percent": [90]})
    assert status == 201, (status, body)
    page.reload()
    assert page.locator("[onfocus]").count() == 0, "an attribute broke out of data-json"
    assert page.locator("button[autofocus]").count() == 0
    rules = [json.loads(b.get_attribute("data-json")) for b in page.locator("button.edit-rule").all()]
    assert hostile in [r["id"] for r in rules], rules
    i = [r["id"] for r in rules].index(hostile)
    page.locator("button.edit-rule").nth(i).click()
    expect(page.get_by_label("Rule id")).to_have_value(hostile)
    shot(page, a.artifacts, "alerts")
    server.shutdown()
    return {"alerts": "ok", "calls": len(Receiver.calls)}


def scenario_limits(page, a):
    sign_in(page, a.portal, a.admin)
    page.get_by_role("link", name="Limits").click()
    field = page.get_by_label("New value for team-daily")
    field.fill("400")
    page.locator('button.save-limit[data-id="team-daily"]').click()
    expect(page.locator("#limit-status")).to_contain_text("team-daily is now 400")
    # The next decision over it is denied.
    d = spend(a.api, a.app, "alice", 500)
    assert d["isGranted"] is False and d["accessDeniedReason"], d
    assert any(c["limitId"] == "team-daily" and c["remaining"] < 500 for c in d["chain"]), d
    assert spend(a.api, a.app, "alice", 300)["isGranted"] is True
    # Above the ceiling: refused, and the page says why.
    field.fill("900000")
    page.locator('button.save-limit[data-id="team-daily"]').click()
    err = page.locator("#page-error")
    expect(err).to_be_visible()
    expect(err).to_contain_text("ceiling of 200000")
    # The field shows what is in force, not the refused value.
    expect(field).to_have_value("400")
    expect(page.locator("#limit-status")).to_contain_text("team-daily is still 400")
    # Changed here: marked, and listed over the file's 10,000.
    expect(page.locator('tr[data-limit="team-daily"] .changed')).to_be_visible()
    expect(page.locator('tr[data-override="limit/team-daily"]')).to_contain_text("10000")
    shot(page, a.artifacts, "limits")

    # Lowering a limit no ceiling covers is asked first; keeping it changes nothing.
    minute = page.get_by_label("New value for user-minute")
    minute.fill("50000")
    page.locator('button.save-limit[data-id="user-minute"]').click()
    warning = page.get_by_role("alertdialog")
    expect(warning).to_contain_text("No ceiling covers user-minute")
    shot(page, a.artifacts, "limits-lower-warning")
    page.get_by_role("button", name="Keep it").click()
    expect(warning).to_be_hidden()
    expect(minute).to_have_value("100000")
    _, limits = api(a.api, "GET", "/v1/customers/acme/limits", a.admin)
    assert next(l for l in limits if l["id"] == "user-minute")["limit"] == 100000
    # Lowered after all: it cannot be raised back by the admin...
    minute.fill("50000")
    page.locator('button.save-limit[data-id="user-minute"]').click()
    page.get_by_role("button", name="Lower it").click()
    expect(page.locator("#limit-status")).to_contain_text("user-minute is now 50000")
    minute.fill("100000")
    page.locator('button.save-limit[data-id="user-minute"]').click()
    expect(page.locator("#page-error")).to_be_visible()
    expect(minute).to_have_value("50000")
    # ...but restoring the file's version brings it back.
    page.locator('tr[data-override="limit/user-minute"] button.restore').click()
    expect(page.locator("#limit-status")).to_contain_text("Restored: limit user-minute")
    expect(page.get_by_label("New value for user-minute")).to_have_value("100000")
    expect(page.locator('tr[data-override="limit/user-minute"]')).to_have_count(0)
    # A viewer key for a dashboard, made here and shown once: it reads, and cannot decide.
    page.get_by_role("link", name="Keys").click()
    page.get_by_label("Role").select_option("viewer")
    page.get_by_label("What it is for").fill("finance dashboard")
    page.get_by_role("button", name="Make key").click()
    expect(page.locator("#new-key-value")).to_contain_text(".")
    key = page.locator("#new-key-value").inner_text().strip()
    shot(page, a.artifacts, "keys")
    status, _ = api(a.api, "GET", "/v1/customers/acme/limits", key)
    assert status == 200, status
    status, _ = api(a.api, "POST", "/v1/customers/acme/entitlements/check", key,
                    {"featureId": "ai-tokens", "requestedUsage": 1, "dimensions": {"userId": "alice"}})
    assert status == 403, status
    page.reload()
    assert key not in page.content(), "the key is shown once"
    page.get_by_role("button", name="Revoke").click()
    expect(page.locator("#keys tbody")).to_contain_text("No keys made here yet")
    status, _ = api(a.api, "GET", "/v1/customers/acme/limits", key)
    assert status == 401, status
    # The audit log shows who changed what.
    page.get_by_role("link", name="Audit log").click()
    expect(page.locator("#audit tbody tr").first).to_contain_text("acme:admin")
    expect(page.locator("#audit tbody")).to_contain_text("team-daily")
    shot(page, a.artifacts, "audit")
    return {"limits": "ok"}


def focused(page, selector):
    return page.evaluate(
        "(s) => !!document.activeElement && document.activeElement.matches(s)", selector)


def tab_to(page, selector, limit=80, back=False):
    """Presses Tab (Shift+Tab with `back`), as a keyboard user does, until the focus is on
    `selector`; fails if it never gets there or if the focus there cannot be seen."""
    for _ in range(limit):
        if focused(page, selector):
            seen = page.evaluate("""() => {
                const s = getComputedStyle(document.activeElement);
                const r = document.activeElement.getBoundingClientRect();
                const ring = (s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) > 0)
                    || s.boxShadow !== 'none';
                return ring && r.width > 0 && r.height > 0 && r.left >= 0 && r.top >= 0;
            }""")
            assert seen, f"the focus on {selector} cannot be seen"
            return
        page.keyboard.press("Shift+Tab" if back else "Tab")
    raise AssertionError(f"Tab never reached {selector}")


def scenario_keyboard(page, a):
    """Everything a customer admin does here without the mouse: sign in, skip to the content,
    open the tree, go to the limits, lower one, and see it applied."""
    page.goto(f"{a.portal}/portal/login")
    tab_to(page, "#token")
    page.keyboard.type(a.admin)
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r".*/portal/c/acme/$"))
    # The first stop on every page is the skip link, shown when focused.
    page.keyboard.press("Tab")
    assert focused(page, "a.skip"), "the first Tab does not reach the skip link"
    tab_to(page, "a.skip")
    # Open the organization's subtree from its toggle.
    tab_to(page, 'li[data-entity="acme"] > .node > button.toggle')
    page.keyboard.press("Enter")
    expect(page.locator('li[data-entity="research"]')).to_be_visible()
    shot(page, a.artifacts, "keyboard-overview")
    # Back up to the navigation, and to the Limits page.
    tab_to(page, 'nav a[href$="/limits"]', back=True)
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r".*/portal/c/acme/limits$"))
    tab_to(page, "#v-team-daily")
    page.keyboard.press("Control+A")
    page.keyboard.type("450")
    tab_to(page, 'button.save-limit[data-id="team-daily"]')
    page.keyboard.press("Enter")
    expect(page.locator("#limit-status")).to_contain_text("team-daily is now 450")
    d = spend(a.api, a.app, "alice", 500)
    assert d["isGranted"] is False, d
    shot(page, a.artifacts, "keyboard-limits")
    return {"keyboard": "ok"}


def scenario_viewer(page, a):
    sign_in(page, a.portal, a.viewer)
    page.get_by_role("link", name="Limits").click()
    expect(page.locator("#limits")).to_be_visible()
    expect(page.locator("button.save-limit")).to_have_count(0)
    expect(page.locator("input[type=number]")).to_have_count(0)
    page.get_by_role("link", name="Alerts").click()
    expect(page.locator("#rule-form")).to_have_count(0)
    expect(page.locator("#hook-form")).to_have_count(0)
    page.get_by_role("link", name="Keys").click()
    expect(page.locator("#key-form")).to_have_count(0)
    expect(page.locator("button.revoke-key")).to_have_count(0)
    # A forged change with the viewer's own session and CSRF token: refused by the API.
    status = page.evaluate("""async () => {
        const csrf = document.querySelector('meta[name="csrf-token"]').content;
        const r = await fetch('/v1/customers/acme/limits/team-daily', {method: 'PUT',
          headers: {'content-type': 'application/json', 'x-csrf-token': csrf},
          body: JSON.stringify({id: 'team-daily', entityType: 'team', feature: 'ai-tokens',
                                kind: 'quota', limit: 1, period: 'P1D'})});
        return r.status; }""")
    assert status == 403, status
    shot(page, a.artifacts, "viewer-limits")
    return {"viewer": "ok"}


def scenario_tenancy(page, a):
    sign_in(page, a.portal, a.globex)
    resp = page.goto(f"{a.portal}/portal/c/acme/")
    assert resp.status == 403, resp.status
    expect(page.locator("p.error:visible")).to_contain_text("do not reach customer `acme`")
    shot(page, a.artifacts, "forbidden")
    for path in ["usage", "alerts", "limits", "keys", "live", "audit"]:
        assert page.goto(f"{a.portal}/portal/c/acme/{path}").status == 403, path
    statuses = page.evaluate("""async () => {
        const csrf = document.querySelector('meta[name="csrf-token"]').content;
        const get = await fetch('/v1/customers/acme/limits');
        const put = await fetch('/v1/customers/acme/limits/team-daily', {method: 'PUT',
          headers: {'content-type': 'application/json', 'x-csrf-token': csrf}, body: '{}'});
        return [get.status, put.status]; }""")
    assert statuses == [403, 403], statuses
    # acme's admin, without the CSRF token: refused, and nothing changed.
    page.context.clear_cookies()
    sign_in(page, a.portal, a.admin)
    result = page.evaluate("""async () => {
        const r = await fetch('/v1/customers/acme/limits/team-daily', {method: 'PUT',
          headers: {'content-type': 'application/json'},
          body: JSON.stringify({id: 'team-daily', entityType: 'team', feature: 'ai-tokens',
                                kind: 'quota', limit: 5, period: 'P1D'})});
        return [r.status, (await r.json()).error.code]; }""")
    assert result == [403, "csrf"], result
    _, limits = api(a.api, "GET", "/v1/customers/acme/limits", a.admin)
    assert next(l for l in limits if l["id"] == "team-daily")["limit"] == 10000
    # Sign-out ends the session.
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r".*/portal/login$"))
    assert page.goto(f"{a.portal}/portal/c/acme/limits").url.endswith("/portal/login")
    return {"tenancy": "ok"}


def call(base, key, user, model, tokens_in, tokens_out):
    """One priced call, as a gateway makes it: a check, then a settle with the token split."""
    units = tokens_in + tokens_out
    status, d = api(base, "POST", "/v1/customers/acme/entitlements/check", key,
                    {"featureId": "ai-tokens", "requestedUsage": units,
                     "dimensions": {"userId": user, "model": model}})
    assert status == 200 and d["isGranted"], (status, d)
    status, s = api(base, "POST", f"/v1/holds/{d['holdId']}/settle", key,
                    {"actualUsage": units, "tokens": {"input": tokens_in, "output": tokens_out}})
    assert status == 200, (status, s)


def table_rows(page, selector):
    return page.eval_on_selector_all(
        f"{selector} tbody tr", "rows => rows.map(r => Array.from(r.cells).map(c => c.innerText))")


def scenario_spend(page, a):
    sign_in(page, a.portal, a.admin)
    # Nothing yet: the empty state says what to do next.
    expect(page.locator("#spend-empty")).to_be_visible()
    expect(page.locator("#spend-total")).to_have_text("$0.00")
    expect(page.locator("#nothing-runs-out")).to_be_visible()
    # Prices per million tokens: gpt-4o 2,500 in and 10,000 out, claude 3,000 and 15,000; a
    # credit is worth $0.01. research (alice): 4,000 in + 2,000 out of gpt-4o = 10 + 20 = 30.
    call(a.api, a.app, "alice", "gpt-4o", 4_000, 2_000)
    # sales (bob): 2,000 in + 1,000 out of claude = 6 + 15 = 21.
    call(a.api, a.app, "bob", "claude-3", 2_000, 1_000)
    d = spend(a.api, a.app, "bob", 20_000)  # over sales' 10,000 a day
    assert not d["isGranted"], d
    _, want = api(a.api, "GET", "/v1/customers/acme/usage/spend?by=teamId&days=7&limit=10", a.admin)
    assert want["total"]["credits"] == 51 and want["total"]["amount"] == "0.51", want
    expect(page.locator("#spend-total")).to_have_text("$0.51", timeout=20_000)
    expect(page.locator("#spend-credits")).to_have_text("51 credits")
    expect(page.locator("#spend-change")).to_have_text("new")
    expect(page.locator("#spend-requests")).to_have_text(str(want["total"]["requests"]))
    expect(page.locator("#spend-denied")).to_have_text("1")
    expect(page.locator("#spend-empty")).to_be_hidden()
    rows = table_rows(page, "#spend-rows")
    shown = [(r[0], r[1], r[2]) for r in rows]
    expected = [(x["value"], f"${x['amount']}", f"{x['credits']:,}") for x in want["rows"]]
    assert shown == expected, (shown, expected)
    assert rows[0][0] == "research" and rows[0][4] == "59 %", rows
    assert table_rows(page, "#spend-denials") == [["team-daily", "1"]]
    # About to run out: research's daily 10,000, 6,000 spent in the last minutes, runs out
    # before midnight at this pace, as the budget API projects it (unless the day ends first).
    _, b = api(a.api, "GET", "/v1/customers/acme/entities/research/budget", a.admin)
    team = next(x for x in b["limits"] if x["limitId"] == "team-daily")
    page.reload()
    soon = page.locator('#running-out tr[data-entity="research"][data-limit="team-daily"]')
    if team["projectedExhaustion"]:
        expect(soon).to_be_visible()
        expect(soon).to_contain_text("6000 / 10000")
    else:
        expect(soon).to_have_count(0)
    expect(page.locator("#spend-total")).to_have_text("$0.51")
    shot(page, a.artifacts, "overview-spend")
    # By model, over the last 24 hours: the same total, split per model.
    page.locator("#spend-form select[name=by]").select_option("model")
    page.locator("#spend-form select[name=days]").select_option("1")
    expect(page.locator("#spend-by")).to_have_text("Model")
    # The denied check named no model: its row spent nothing.
    wait_for(lambda: [r[0] for r in table_rows(page, "#spend-rows")] == ["gpt-4o", "claude-3", "(none)"],
             "the rows by model")
    assert [r[1] for r in table_rows(page, "#spend-rows")] == ["$0.30", "$0.21", "$0.00"]
    # Drill down from a team to its place in the tree, with its limits.
    page.locator("#spend-form select[name=by]").select_option("teamId")
    page.locator("#spend-rows a", has_text="sales").click()
    expect(page.locator('li[data-entity="sales"]')).to_be_visible()
    expect(page.locator('li[data-entity="sales"] [data-limit="team-daily"]')).to_be_visible()
    # The operator sees every customer, and each one's first screen the same way.
    page.get_by_role("button", name="Sign out").click()
    sign_in(page, a.portal, a.operator)
    expect(page.get_by_role("link", name="acme")).to_be_visible()
    # Every customer with its week's spend, as its own spend API counts it.
    acme = page.locator('#customers tr[data-customer="acme"]')
    expect(acme.locator(".spent")).to_have_text("$0.51")
    expect(acme.locator(".calls")).to_have_text("2")
    expect(acme.locator(".denied")).to_have_text("1")
    expect(page.locator('#customers tr[data-customer="globex"] .spent')).to_have_text("$0.00")
    shot(page, a.artifacts, "operator-customers")
    page.goto(f"{a.portal}/portal/c/acme/")
    expect(page.locator("#spend-total")).to_have_text("$0.51")
    shot(page, a.artifacts, "operator-overview")
    return {"spend": "ok"}


def scenario_tour(page, a):
    """After real traffic through Envoy (made by the Rust test): as acme's admin, its viewer and
    the operator, every figure of the first screen is the spend API's, and the credit pool's
    counter is the spend; users created on first sight are in the tree; the pool shows its grant."""
    _, want = api(a.api, "GET", "/v1/customers/acme/usage/spend?by=teamId&days=7&limit=10", a.admin)
    _, budget = api(a.api, "GET", "/v1/customers/acme/entities/acme/budget", a.admin)
    pool = next(x for x in budget["limits"] if x["limitId"] == "acme-credits")
    # The counter and the records agree: what the pool was charged is the period's spend.
    assert pool["used"] == want["total"]["credits"] > 0, (pool, want["total"])
    assert pool["limit"] == 1_000_000 and pool["remaining"] == 1_000_000 - pool["used"], pool
    assert want["total"]["requests"] == 5 and want["total"]["denied"] == 1, want["total"]
    assert want["denials"] == [{"limitId": "research-daily", "denied": 1}], want["denials"]
    _, zed = api(a.api, "GET", "/v1/customers/acme/entities/zed/budget", a.admin)
    assert zed["entityType"] == "user", zed

    def dollars(amount):
        return f"${float(amount):,.2f}"

    for who, token in [("admin", a.admin), ("viewer", a.viewer), ("operator", a.operator)]:
        page.context.clear_cookies()
        sign_in(page, a.portal, token)
        page.goto(f"{a.portal}/portal/c/acme/")
        expect(page.locator("#spend-total")).to_have_text(dollars(want["total"]["amount"]))
        expect(page.locator("#spend-credits")).to_have_text(f"{want['total']['credits']:,} credits")
        expect(page.locator("#spend-requests")).to_have_text(str(want["total"]["requests"]))
        expect(page.locator("#spend-denied")).to_have_text("1")
        rows = table_rows(page, "#spend-rows")
        shown = [(r[0], r[1], r[2], r[5]) for r in rows]
        expected = [(x["value"] or "(none)", dollars(x["amount"]), f"{x['credits']:,}", f"{x['units']:,}")
                    for x in want["rows"]]
        assert shown == expected, (who, shown, expected)
        assert table_rows(page, "#spend-denials") == [["research-daily", "1"]], who
        # The pool's bar: what was used of what the grant gave.
        nums = page.locator('li[data-entity="acme"] > .bars > [data-limit="acme-credits"] .nums')
        expect(nums).to_contain_text(f"{pool['used']} / 1000000")
        # Users created on first sight are found, with their budgets.
        page.fill("#q", "z")
        expect(page.locator('li[data-entity="zed"]')).to_be_visible()
        expect(page.locator('li[data-entity="zoe"]')).to_be_visible()
        expect(page.locator('li[data-entity="zed"] [data-limit="user-daily"]')).to_be_visible()
        shot(page, a.artifacts, f"tour-{who}")
        if who == "viewer":
            page.goto(f"{a.portal}/portal/c/acme/limits")
            expect(page.locator("button.save-limit")).to_have_count(0)
    return {"tour": "ok"}


def live_rows(page):
    """The live table's rows on the current page, as lists of cell texts."""
    return page.eval_on_selector_all(
        "#live tbody tr", "rows => rows.map(r => Array.from(r.cells).map(c => c.innerText))")


def scenario_live(page, a):
    sign_in(page, a.portal, a.admin)
    page.goto(f"{a.portal}/portal/c/acme/live")
    expect(page.locator("#live-status")).to_have_text(re.compile("^Live"))
    expect(page.locator("#live-empty")).to_be_visible()
    # Made after the page opened: one call of alice (research), 30 of the crowd, and one
    # refusal by the team's daily limit (10,000).
    spend(a.api, a.app, "alice", 120)
    for i in range(1, 31):
        spend(a.api, a.app, f"user-{i:03}", 10)
    d = spend(a.api, a.app, "bob", 20_000)
    assert not d["isGranted"], d
    expect(page.locator("#live-range")).to_have_text("1–25 of 32")
    assert len(live_rows(page)) == 25
    top = live_rows(page)[0]
    # time, event, who (root first), model, units (what it asked), outcome.
    assert top[1:] == ["denied", "acme › sales › bob", "", "20,000 asked", "denied by team-daily"], top
    expect(page.locator("#live-empty")).to_be_hidden()
    page.get_by_role("button", name="Older").click()
    expect(page.locator("#live-range")).to_have_text("26–32 of 32")
    last = live_rows(page)[-1]
    assert last[1:] == ["settled", "acme › research › alice", "", "120", "granted"], last
    page.get_by_role("button", name="Newer").click()
    page.get_by_label("Filter", exact=True).fill("alice")
    expect(page.locator("#live-range")).to_have_text("1–1 of 1 matching (32 kept)")
    page.get_by_label("Filter", exact=True).fill("")
    page.get_by_label("Show").select_option("denied")
    expect(page.locator("#live-range")).to_have_text("1–1 of 1 matching (32 kept)")
    page.get_by_label("Show").select_option("all")
    # A stream the gateway cut when its next slice was refused settles with how it ended: the
    # row says so and by which limit, and the "cut streams" filter finds it alone.
    status, d = api(a.api, "POST", "/v1/customers/acme/entitlements/check", a.app,
                    {"featureId": "ai-tokens", "requestedUsage": 64, "dimensions": {"userId": "alice"}})
    assert status == 200 and d["isGranted"], (status, d)
    status, s = api(a.api, "POST", f"/v1/holds/{d['holdId']}/settle", a.app,
                    {"actualUsage": 64, "streamEnd": {"how": "cut", "by": "team-daily"}})
    assert status == 200 and s["closed"], (status, s)
    expect(page.locator("#live-range")).to_have_text("1–25 of 33")
    top = live_rows(page)[0]
    assert top[1:] == ["settled · stream cut", "acme › research › alice", "", "64",
                       "stream cut by team-daily"], top
    assert page.locator("#live tbody tr").first.get_attribute("data-kind") == "cut"
    page.get_by_label("Show").select_option("cut")
    expect(page.locator("#live-range")).to_have_text("1–1 of 1 matching (33 kept)")
    page.get_by_label("Show").select_option("all")
    shot(page, a.artifacts, "live")

    # The server restarts: sessions are gone, so the page says so and offers the sign-in
    # rather than reconnecting forever.
    print("restart", flush=True)
    assert sys.stdin.readline().strip() == "restarted"
    expect(page.locator("#live-signin")).to_be_visible(timeout=30_000)
    expect(page.locator("#live-status")).to_have_text(re.compile("signed out"))
    shot(page, a.artifacts, "live-signed-out")
    page.get_by_role("link", name="sign in again").click()
    page.wait_for_url(re.compile(r".*/portal/login$"))
    sign_in(page, a.portal, a.admin)
    page.goto(f"{a.portal}/portal/c/acme/live")
    expect(page.locator("#live-status")).to_have_text(re.compile("^Live"))
    spend(a.api, a.app, "alice", 7)
    expect(page.locator("#live tbody tr").first).to_contain_text("acme › research › alice")
    assert live_rows(page)[0][4] == "7", live_rows(page)[0]
    return {"live": "ok"}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("scenario", choices=["overview", "alerts", "limits", "viewer", "tenancy", "keyboard", "live", "spend", "tour"])
    p.add_argument("--portal", required=True, help="the sidecar's HTTP address, http://127.0.0.1:PORT")
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--artifacts", default="")
    a = p.parse_args()
    a.api = a.portal
    a.admin, a.viewer, a.app, a.globex, a.operator = (os.environ[k] for k in (
        "PORTAL_ACME_ADMIN", "PORTAL_ACME_VIEWER", "PORTAL_ACME_APP", "PORTAL_GLOBEX_ADMIN",
        "PORTAL_OPERATOR"))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=a.chromium, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        context = browser.new_context(viewport={"width": 1366, "height": 900}, accept_downloads=True)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        try:
            out = globals()[f"scenario_{a.scenario}"](page, a)
        except Exception:
            shot(page, a.artifacts, f"failed-{a.scenario}")
            raise
        finally:
            browser.close()
    # Refused requests the scenario provokes log console errors; script errors are defects.
    script_errors = [e for e in errors if "Failed to load resource" not in e]
    assert not script_errors, script_errors
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
