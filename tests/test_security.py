"""The web page and API on a hospital network, against a real `lungnode serve` process: nothing but
/health, /metrics and the login page answers without a login (every route of the app is tried), a
cross-origin or token-less POST is refused, only allowed Host names are served, a radiologist reads but
cannot re-run or re-send, API tokens from `lungnode users token` work and are revoked, HTTPS serves the
page with Secure cookies, and what users do is in the audit trail (local log and syslog over TLS)."""
from __future__ import annotations

import base64
import re
import socket
import ssl
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import requests
import trustme
from starlette.routing import Mount

from lungnode.accounts import Accounts
from lungnode.api import create_app
from lungnode.audit import AuditTrail
from lungnode.config import Settings
from lungnode.node import Node
from lungnode.peers import PEER_ENV, NodeProcess, free_port, wait_for
from lungnode.web.security import is_open
from tests.conftest import need_tool, send_to_node, wait_processed
from tests.oidc_provider import Provider
from tests.syslog_collector import Collector

READER, READER_PASSWORD = "dr.lan", "radiology reading room 1"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    node = NodeProcess(tmp_path_factory.mktemp("security") / "node", stable_seconds=1,
                       pacs=f"PACS@127.0.0.1:{free_port()}", send_retry_first_seconds=1, send_retry_max_seconds=30)
    node.start()
    yield node
    node.stop()


def users_cli(node: NodeProcess, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """`lungnode users ...` on the node's data directory, as the admin runs it beside the running node."""
    return subprocess.run([sys.executable, "-m", "lungnode.cli", "users", *args], input=stdin, text=True,
                          capture_output=True, env=node.env, timeout=60)


@pytest.fixture(scope="module")
def reader(node) -> requests.Session:
    """A radiologist added with the CLI, logged in."""
    added = users_cli(node, "add", READER, "--role", "radiologist", stdin=READER_PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    return node.login(READER, READER_PASSWORD)


@pytest.fixture(scope="module")
def study(node, small_ct_series) -> str:
    uid = send_to_node(node, small_ct_series)
    wait_processed(node, uid)
    return uid


def audit_records(node: NodeProcess) -> list[ET.Element]:
    return [ET.fromstring(line) for path in sorted((node.data_dir / "audit").glob("audit-*.log"))
            for line in path.read_text().splitlines()]


def find_records(node: NodeProcess, event_id: str, user: str, study_uid: str | None = None) -> list[ET.Element]:
    """Audit messages of `event_id` requested by `user` from 127.0.0.1 (about `study_uid` when given)."""
    out = []
    for r in audit_records(node):
        who = r.find("ActiveParticipant[@UserIsRequestor='true']")
        objects = {o.get("ParticipantObjectID") for o in r.iter("ParticipantObjectIdentification")
                   if o.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"}
        if (r.find("EventIdentification/EventID").get("csd-code") == event_id and who.get("UserID") == user
                and who.get("NetworkAccessPointID") == "127.0.0.1" and (study_uid is None or study_uid in objects)):
            out.append(r)
    return out


def app_routes(tmp_path: Path) -> list[tuple[str, str]]:
    """(method, path) of every route of the app as `lungnode serve` builds it; a static file for a mount."""
    settings = Settings(data_dir=tmp_path)
    node = Node(settings)
    app = create_app(node, Accounts(settings.accounts_path), AuditTrail(settings.audit_dir, "TEST"))
    node.db.close()
    routes = []
    for route in app.routes:
        if isinstance(route, Mount):
            routes.append(("GET", f"{route.path}/style.css"))
        else:
            routes += [(method, route.path) for method in sorted(route.methods)]
    return routes


def test_every_route_but_health_metrics_and_login_refuses_anonymous_requests(node, study, tmp_path):
    values = {"study_uid": study, "number": "1", "k": "0"}  # a new path parameter fails here: add it
    checked = set()
    for method, template in app_routes(tmp_path):
        path = re.sub(r"\{(\w+)\}", lambda m: values[m[1]], template)
        url = f"{node.url}{path}"
        if is_open(path):
            if method == "GET":
                assert requests.get(url, timeout=10).status_code == 200, path
            continue
        api = requests.request(method, url, timeout=10, allow_redirects=False)
        assert api.status_code == 401 and api.headers["WWW-Authenticate"] == "Bearer", (method, path)
        assert study not in api.text
        bad_cookie = requests.request(method, url, cookies={"lungnode_session": "forged"}, timeout=10,
                                      allow_redirects=False)
        assert bad_cookie.status_code == 401, (method, path)
        if method == "GET" and not path.startswith("/api/"):  # a browser asking for a page goes to the login
            page = requests.get(url, headers={"Accept": "text/html"}, timeout=10, allow_redirects=False)
            assert page.status_code == 303 and page.headers["location"].startswith("/login?next=%2F"), path
        checked.add(template)
    assert {"/", "/studies/{study_uid}", "/api/studies", "/api/studies/{study_uid}/rerun", "/docs",
            "/openapi.json", "/logout"} <= checked


def test_no_server_path_in_what_the_api_answers(node, study):
    health = requests.get(f"{node.url}/health", timeout=10).json()
    assert not [v for v in health.values() if isinstance(v, str) and "/" in v]
    detail = node.http.get(f"{node.url}/api/studies/{study}", timeout=10)
    assert detail.json()["deliveries"] and "path" not in detail.json()["deliveries"][0]
    assert str(node.data_dir) not in detail.text and "/tmp" not in detail.text


def test_the_application_log_holds_no_patient_name_or_id(node, study):
    """The study was received, processed, shown and delivered: its log (INFO) names Study UIDs and AE
    titles, never the patient."""
    detail = node.study(study)
    assert detail["patient_id"] and detail["patient_name"]
    log_text = node.log_text()
    assert study in log_text  # the log does speak of the study ...
    assert detail["patient_id"] not in log_text and detail["patient_name"] not in log_text  # ... not of its patient


def test_a_cross_origin_or_token_less_post_is_refused(node, study):
    admin = node.http
    rerun = f"{node.url}/api/studies/{study}/rerun"
    csrf = admin.headers["X-CSRF-Token"]
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Origin": None, "Referer": "http://evil.example/page"}, {"Origin": None}):
        r = admin.post(rerun, headers=headers, timeout=10)
        assert r.status_code == 403 and "cross-origin" in r.json()["detail"], headers
    for token in (None, "", csrf[:-1] + "x"):
        r = admin.post(rerun, headers={"X-CSRF-Token": token}, timeout=10)
        assert r.status_code == 403 and "X-CSRF-Token" in r.json()["detail"], token
    another = node.login()  # a token is good for its own session only
    assert admin.post(rerun, headers={"X-CSRF-Token": another.headers["X-CSRF-Token"]}, timeout=10).status_code == 403
    login = requests.post(f"{node.url}/login", data={"username": "admin", "password": node.admin_password},
                          headers={"Origin": "http://evil.example"}, allow_redirects=False, timeout=10)
    assert login.status_code == 403 and "set-cookie" not in login.headers
    assert node.study(study)["version"] == 1, "nothing was re-run"


def test_only_allowed_host_names_are_served(node):
    for path in ("/health", "/login", "/api/studies", "/"):
        r = requests.get(f"{node.url}{path}", headers={"Host": "evil.example"}, timeout=10)
        assert r.status_code == 400, path
    assert requests.get(f"{node.url}/health", headers={"Host": f"localhost:{node.http_port}"},
                        timeout=10).status_code == 200  # the other default name


def test_a_radiologist_reads_but_cannot_rerun_or_resend_and_an_admin_can(node, reader, study):
    assert reader.get(f"{node.url}/api/studies/{study}", timeout=10).json()["study_uid"] == study
    assert reader.get(f"{node.url}/api/me", timeout=10).json()["role"] == "radiologist"
    for action in ("rerun", "resend"):
        r = reader.post(f"{node.url}/api/studies/{study}/{action}", timeout=10)
        assert r.status_code == 403 and "admin" in r.json()["detail"], action
    assert node.study(study)["version"] == 1 and len(node.study(study)["deliveries"]) == 1
    assert 'id="rerun"' not in reader.get(f"{node.url}/studies/{study}", timeout=10).text  # no buttons shown
    assert 'id="rerun"' in node.http.get(f"{node.url}/studies/{study}", timeout=10).text

    assert node.http.post(f"{node.url}/api/studies/{study}/resend", timeout=10).json() == {"queued": True}
    assert len(node.study(study)["deliveries"]) == 2
    assert node.http.post(f"{node.url}/api/studies/{study}/rerun", timeout=10).json() == {"queued": True}
    wait_processed(node, study, version=2)


def test_viewing_rerunning_and_resending_a_study_leave_audit_records(node, reader, study):
    patient_id = node.study(study)["patient_id"]
    assert reader.get(f"{node.url}/api/studies/{study}", timeout=10).ok
    assert reader.get(f"{node.url}/api/studies/{study}/viewer", timeout=60).ok
    assert reader.get(f"{node.url}/api/studies/{study}/slices/0", timeout=30).ok
    (record,) = find_records(node, "110110", READER, study)  # Patient Record read: once, however often polled
    assert reader.get(f"{node.url}/api/studies/{study}", timeout=10).ok
    assert len(find_records(node, "110110", READER, study)) == 1
    assert record.find("EventIdentification").get("EventActionCode") == "R"
    patients = [o.get("ParticipantObjectID") for o in record.iter("ParticipantObjectIdentification")
                if o.find("ParticipantObjectIDTypeCode").get("csd-code") == "2"]
    assert patients == [patient_id]
    images = find_records(node, "110103", READER, study)  # DICOM Instances Accessed: the viewer and the slice
    assert len(images) == 1 and images[0].find("EventIdentification").get("EventActionCode") == "R"

    version = node.study(study)["version"]
    assert node.http.post(f"{node.url}/api/studies/{study}/rerun", timeout=10).ok
    assert node.http.post(f"{node.url}/api/studies/{study}/resend", timeout=10).ok
    rerun = [r for r in find_records(node, "110103", "admin", study)
             if r.find("EventIdentification/EventTypeCode").get("csd-code") == "RERUN"]
    resend = [r for r in find_records(node, "110104", "admin", study)
              if r.find("EventIdentification/EventTypeCode").get("csd-code") == "RESEND"]
    assert rerun and rerun[-1].find("EventIdentification").get("EventOutcomeIndicator") == "0"
    assert resend and resend[-1].find("EventIdentification").get("EventOutcomeIndicator") == "0"
    wait_processed(node, study, version=version + 1)


def test_each_dicom_association_is_audited_with_caller_address_tls_and_studies(node, small_ct_series, study):
    """The store that sent the study, and an association refused for its Called AE title."""
    (stored,) = find_records(node, "110104", "MODALITY", study)
    assert stored.find("EventIdentification").get("EventOutcomeIndicator") == "0"
    assert {c.get("csd-code") for c in stored.iter("EventTypeCode")} == {"PLAIN"}  # not over TLS here
    details = {d.get("type"): base64.b64decode(d.get("value")).decode()
               for d in stored.iter("ParticipantObjectDetail")}
    assert details.get("InstancesStoredInAssociation") == str(len(small_ct_series))
    refused = subprocess.run([need_tool("echoscu"), "-aet", "PROBE", "-aec", "WRONGAE", "127.0.0.1",
                              str(node.dicom_port)], env=PEER_ENV, capture_output=True, text=True)
    assert refused.returncode != 0
    wait_for(lambda: find_records(node, "110114", "PROBE"), 10, "the refused association's audit record", 0.1)
    (login,) = find_records(node, "110114", "PROBE")
    assert login.find("EventIdentification").get("EventOutcomeIndicator") != "0"
    assert "WRONGAE" in login.findtext("EventIdentification/EventOutcomeDescription")


def test_logins_good_and_bad_and_logouts_are_audited_and_the_cookie_is_locked_down(node):
    bad = requests.post(f"{node.url}/login", data={"username": READER, "password": "wrong password!!"},
                        headers={"Origin": node.url}, allow_redirects=False, timeout=30)
    assert bad.status_code == 401 and "set-cookie" not in bad.headers
    (failed,) = [r for r in find_records(node, "110114", READER)
                 if r.find("EventIdentification").get("EventOutcomeIndicator") == "4"]
    assert failed.find("EventIdentification/EventTypeCode").get("csd-code") == "110122"

    http = requests.Session()
    good = http.post(f"{node.url}/login", data={"username": "admin", "password": node.admin_password},
                     headers={"Origin": node.url}, allow_redirects=False, timeout=30)
    cookie = good.headers["set-cookie"]
    assert good.status_code == 303 and re.search(r"(?i)httponly", cookie) and re.search(r"(?i)samesite=strict", cookie)
    assert not re.search(r"(?i)secure", cookie), "plain HTTP: a Secure cookie would never come back"
    page = http.get(f"{node.url}/", timeout=10)
    assert page.headers["X-Frame-Options"] == "DENY" and "frame-ancestors 'none'" in page.headers[
        "Content-Security-Policy"], "the page cannot be framed by another site (clickjacking)"
    csrf = http.get(f"{node.url}/api/me", timeout=10).json()["csrf_token"]
    assert http.post(f"{node.url}/logout", headers={"Origin": node.url, "X-CSRF-Token": csrf}, timeout=10).ok
    assert http.get(f"{node.url}/api/studies", timeout=10).status_code == 401
    assert find_records(node, "110114", "admin")[-1].find(
        "EventIdentification/EventTypeCode").get("csd-code") == "110123"  # Logout


def test_password_guessing_is_cut_off_after_five_failures_for_a_name(node):
    password = "the right password 2"
    assert users_cli(node, "add", "dr.minh", "--role", "radiologist", stdin=password + "\n").returncode == 0

    def attempt(guess: str) -> int:
        return requests.post(f"{node.url}/login", data={"username": "dr.minh", "password": guess},
                             headers={"Origin": node.url}, allow_redirects=False, timeout=30).status_code

    assert [attempt(f"guess number {i}") for i in range(5)] == [401] * 5
    assert attempt(password) == 429, "locked: not even the right password is looked at"
    (refused,) = [r for r in find_records(node, "110114", "dr.minh")
                  if "too many" in (r.findtext("EventIdentification/EventOutcomeDescription") or "")]
    assert refused.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert node.login().get(f"{node.url}/api/me", timeout=10).ok, "other accounts log in as before"


def test_api_tokens_made_with_the_cli_work_without_cookies_and_can_be_revoked(node, study):
    made = users_cli(node, "token", "ris-robot", "--role", "radiologist")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("lnt_") and "shown only now" in made.stderr
    bearer = {"Authorization": f"Bearer {token}"}
    assert requests.get(f"{node.url}/api/studies/{study}", headers=bearer, timeout=10).ok
    assert requests.post(f"{node.url}/api/studies/{study}/rerun", headers=bearer, timeout=10).status_code == 403
    assert token not in users_cli(node, "list").stdout
    assert re.search(r"token\s+ris-robot\s+radiologist", users_cli(node, "list").stdout)
    assert find_records(node, "110110", "ris-robot", study)

    admin_token = users_cli(node, "token", "pacs-admin-robot", "--role", "admin").stdout.strip()
    queued = requests.post(f"{node.url}/api/studies/{study}/resend", timeout=10,
                           headers={"Authorization": f"Bearer {admin_token}"})  # no CSRF token: none needed
    assert queued.json() == {"queued": True}

    assert users_cli(node, "token", "ris-robot", "--revoke").returncode == 0
    assert requests.get(f"{node.url}/api/studies", headers=bearer, timeout=10).status_code == 401
    created = [r for r in audit_records(node) if r.find("EventIdentification/EventID").get("csd-code") == "110113"]
    assert {o.get("ParticipantObjectID") for r in created for o in r.iter("ParticipantObjectIdentification")} >= {
        "admin", READER, "ris-robot", "pacs-admin-robot"}


def test_passwd_with_the_cli_ends_the_users_sessions(node, reader):
    assert reader.get(f"{node.url}/api/me", timeout=10).ok
    assert users_cli(node, "passwd", READER, stdin="short\n").returncode == 1  # refused: the old one stands
    assert users_cli(node, "passwd", READER, stdin="a brand new password\n").returncode == 0
    assert reader.get(f"{node.url}/api/me", timeout=10).status_code == 401
    with pytest.raises(PermissionError):
        node.login(READER, READER_PASSWORD)
    assert node.login(READER, "a brand new password").get(f"{node.url}/api/me", timeout=10).ok


def test_the_first_start_makes_an_admin_with_a_password_printed_once(tmp_path):
    node = NodeProcess(tmp_path / "node")
    del node.env["LUNGNODE_ADMIN_PASSWORD"]  # as `make run` starts it
    node.start()
    try:
        (password,) = re.findall(r"created the admin account 'admin' with the password\s+(\S+)", node.log_text())
        assert node.login("admin", password).get(f"{node.url}/api/me", timeout=10).json()["role"] == "admin"
    finally:
        node.stop()
    node.start()  # the second start keeps the account and prints nothing
    node.stop()
    assert node.log_text().count("created the admin account") == 1
    assert password not in "".join(p.read_text() for p in (node.data_dir / "audit").glob("*.log"))
    events = [ET.fromstring(line).find("EventIdentification/EventTypeCode").get("csd-code")
              for path in (node.data_dir / "audit").glob("*.log") for line in path.read_text().splitlines()
              if "110100" in line]
    assert events == ["110120", "110121", "110120", "110121"], "each start and stop is in the audit trail"


def test_https_with_secure_cookies_and_audit_to_syslog_over_mutual_tls(tmp_path, monkeypatch):
    ca = trustme.CA()
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "node.pem", tmp_path / "node.key"
    ca.cert_pem.write_to_path(str(ca_file))
    node_cert = ca.issue_cert("127.0.0.1", "localhost")
    node_cert.cert_chain_pems[0].write_to_path(str(cert_file))
    node_cert.private_key_pem.write_to_path(str(key_file))
    collector_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca_file))
    collector_context.verify_mode = ssl.CERT_REQUIRED  # the node must show its certificate (ATNA)
    ca.issue_cert("127.0.0.1").configure_cert(collector_context)
    collector = Collector(collector_context)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca_file))  # requests trusts the test CA
    node = NodeProcess(tmp_path / "node", tls_cert=cert_file, tls_key=key_file,
                       audit_syslog=f"127.0.0.1:{collector.port}", audit_syslog_ca=ca_file)
    assert node.url.startswith("https://")
    node.start()
    try:
        with ssl.create_default_context(cafile=str(ca_file)).wrap_socket(
                socket.create_connection(("127.0.0.1", node.http_port)),
                server_hostname="127.0.0.1") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        login = requests.post(f"{node.url}/login", data={"username": "admin", "password": node.admin_password},
                              headers={"Origin": node.url}, allow_redirects=False, timeout=30)
        assert login.status_code == 303 and re.search(r"(?i);\s*secure", login.headers["set-cookie"])
        assert login.headers["Strict-Transport-Security"].startswith("max-age=")
        assert node.http.get(f"{node.url}/api/studies", timeout=10).json() == []
        bad = requests.post(f"{node.url}/login", data={"username": "mallory", "password": "guess guess guess"},
                            headers={"Origin": node.url}, allow_redirects=False, timeout=30)
        assert bad.status_code == 401

        def failed_login_arrived() -> bool:
            return any(p.get("UserID") == "mallory" for m in collector.messages()
                       for p in m.audit.iter("ActiveParticipant"))

        wait_for(failed_login_arrived, 60, "the failed login at the syslog collector")
    finally:
        node.stop()
        collector.close()
    assert collector.peer_certificates and collector.peer_certificates[0]["subject"], "the node showed its certificate"
    events = [m.audit.find("EventIdentification/EventID").get("csd-code") for m in collector.messages()]
    assert events[:2] == ["110113", "110100"]  # the first admin made, the node started
    assert all(m.msgid == "IHE+RFC-3881" for m in collector.messages())


@pytest.fixture
def provider():
    provider = Provider("lungnode", "client secret", {"sub": "u-1842", "preferred_username": "dr.binh",
                                                      "groups": ["staff", "lungnode-radiologist"]})
    yield provider
    provider.close()


def test_sign_in_through_the_hospital_openid_connect_provider(tmp_path, provider):
    node = NodeProcess(tmp_path / "node", oidc_issuer=provider.issuer, oidc_client_id="lungnode",
                       oidc_client_secret="client secret")
    node.start()
    try:
        assert 'id="login-oidc"' in requests.get(f"{node.url}/login", timeout=10).text
        browser_like = requests.Session()
        landed = browser_like.get(f"{node.url}/login/oidc?next=/api/me", timeout=30)  # there and back again
        assert landed.status_code == 200 and 'url=/api/me' in landed.text
        me = browser_like.get(f"{node.url}/api/me", timeout=10).json()
        assert (me["name"], me["role"]) == ("dr.binh", "radiologist")
        assert browser_like.post(f"{node.url}/api/studies/1.2.3/rerun", timeout=10,
                                 headers={"Origin": node.url, "X-CSRF-Token": me["csrf_token"]}).status_code == 403
        with pytest.raises(PermissionError):  # no password of its own here
            node.login("dr.binh", "")
        (signed_in,) = [r for r in find_records(node, "110114", "dr.binh")
                        if r.find("EventIdentification").get("EventOutcomeIndicator") == "0"]

        provider.claims = {**provider.claims, "groups": ["lungnode-admin"]}  # the role follows the provider
        again = requests.Session()
        again.get(f"{node.url}/login/oidc", timeout=30)
        assert again.get(f"{node.url}/api/me", timeout=10).json()["role"] == "admin"

        provider.nonce_override = "a nonce from another sign-in"  # a replayed ID token
        replay = requests.Session()
        refused = replay.get(f"{node.url}/login/oidc", timeout=30)
        assert refused.status_code == 403 and replay.get(f"{node.url}/api/me", timeout=10).status_code == 401
        provider.nonce_override = None

        provider.claims = {**provider.claims, "preferred_username": "dr.khoa", "groups": ["staff"]}
        outsider = requests.Session()
        refused = outsider.get(f"{node.url}/login/oidc", timeout=30)
        assert refused.status_code == 403 and "neither lungnode group" in refused.text
        assert outsider.get(f"{node.url}/api/me", timeout=10).status_code == 401

        stranger = requests.Session()  # a callback this browser did not start (login CSRF) is refused
        start = requests.get(f"{node.url}/login/oidc", timeout=30, allow_redirects=False)
        to_callback = requests.get(start.headers["location"], timeout=30, allow_redirects=False).headers["location"]
        assert stranger.get(to_callback, timeout=30).status_code == 403
        assert stranger.get(f"{node.url}/api/me", timeout=10).status_code == 401

        provider.claims = {**provider.claims, "preferred_username": "admin", "groups": ["lungnode-admin"]}
        taken = requests.Session()  # the provider cannot take over a local account
        assert taken.get(f"{node.url}/login/oidc", timeout=30).status_code == 403

        provider.close()  # a provider that is down: the node says so, and its own login still works
        down = NodeProcess(tmp_path / "node2", oidc_issuer=provider.issuer, oidc_client_id="lungnode").start()
        try:
            assert requests.get(f"{down.url}/login/oidc", timeout=30).status_code == 503
            assert down.http.get(f"{down.url}/api/me", timeout=10).ok
        finally:
            down.stop()
    finally:
        node.stop()
    failures = [r.findtext("EventIdentification/EventOutcomeDescription") for r in audit_records(node)
                if r.find("EventIdentification").get("EventOutcomeIndicator") == "4"]
    assert len(failures) == 5, failures  # the password tried for dr.binh, and the four refusals above
    assert "nonce" in failures[1] and "neither lungnode group" in failures[2]
    assert "foreign sign-in state" in failures[3] and "local account" in failures[4]
