"""The review page and `autocaption search`: the JSON API through Flask's test client on photos really
described by the tiny model, its security (token, header for changes, ids only, escaping, read-only),
search ranking and paging, a correction that ends up in the photo and survives `process --force`, and a
real headless Chromium driving the page."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from autocaption.config import Config, load
from autocaption.journal import Journal
from autocaption.review import Review
from autocaption.web.app import COOKIE, HEADER, create_app
from tests import exiftool
from tests.conftest import RunCli, cli_env

SCRIPT_NAME = "<script>alert(1)<b>.jpg"  # a file name cannot hold "/", so no closing tag
PHOTOS = ["jpg/gps/DSCN0010.jpg", "jpg/gps/DSCN0012.jpg", "jpg/gps/DSCN0021.jpg", "jpg/camera/Canon_40D.jpg",
          "jpg/orientation/portrait_6.jpg"]  # fmt: skip
RULES = """
- {name: caption, prompt: "Describe.", max_new_tokens: 12, write: [description]}
- {name: tags, prompt: "Keywords.", max_new_tokens: 8, write: [keywords]}
"""
TOKEN = "test-token-0123456789abcdef"


@pytest.fixture
def described(make_config: Callable[..., Path], corpus: Path, tmp_path: Path) -> Config:
    """Six photos described by the tiny model (one named like a script); `autocaption process` in-process
    (the CLI's own run is tested elsewhere; here it would only add its start-up to every test)."""
    from autocaption.process import process

    folder = tmp_path / "photos"
    folder.mkdir()
    for source in PHOTOS:
        shutil.copyfile(corpus / source, folder / Path(source).name)
    shutil.copyfile(corpus / "jpg/gps/DSCN0025.jpg", folder / SCRIPT_NAME)
    config = load(make_config(rules=RULES, extra=f"watch: [{{path: {str(folder)!r}}}]"))
    summary = process(config, [folder])
    assert summary.images == len(PHOTOS) + 1 and not summary.failures, summary.failures
    return config


@pytest.fixture
def client(described: Config) -> Iterator[Any]:
    journal = Journal(described.state.dir)
    yield create_app(described, Review(described, journal), TOKEN).test_client()
    journal.close()


def auth(**headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", **headers}


def ids(client: Any, **query: Any) -> list[int]:
    return [image["id"] for image in client.get("/api/images", query_string=query, headers=auth()).json["images"]]


def test_every_request_needs_the_token(client: Any) -> None:
    for url in ("/", "/api/images", "/api/images/1", "/thumbnails/1.jpg", "/previews/1.jpg", "/static/app.js",
                "/images/1"):  # fmt: skip
        assert client.get(url).status_code == 401, url
        assert client.get(url, headers={"Authorization": "Bearer wrong-token-000000"}).status_code == 401, url
        assert client.get(url, headers=auth()).status_code == 200, url
    assert "needs its access token" in client.get("/").get_data(as_text=True)


def test_the_token_link_sets_a_strict_cookie_and_changes_need_the_header(client: Any) -> None:
    visit = client.get(f"/?token={TOKEN}")
    assert visit.status_code == 302 and visit.headers["Location"] == "/"  # the token leaves the address bar
    cookie = visit.headers["Set-Cookie"]
    assert f"{COOKIE}={TOKEN}" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert client.get("/api/images").status_code == 200  # the cookie is enough to look
    refused = client.post("/api/images/1/describe")  # ...but not to change: a form on another site sends it too
    assert refused.status_code == 403 and HEADER in refused.json["error"]
    assert client.post("/api/images/1/describe", headers={HEADER: TOKEN}).status_code == 200


@pytest.mark.parametrize(
    "url",
    ["/api/images/../../etc/passwd", "/api/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/thumbnails/..%2f..%2fetc%2fpasswd",
     "/previews/%2Fetc%2Fpasswd.jpg", "/api/images/999999", "/api/images/-1", "/thumbnails/0.jpg",
     "/static/../../autocaption/config.py", "/static/%2e%2e/%2e%2e/pyproject.toml", "/images//etc/passwd"],
)  # fmt: skip
def test_no_request_reaches_a_file_by_path(client: Any, url: str) -> None:
    response = client.get(url, headers=auth())
    assert response.status_code == 404, (url, response.status_code)
    body = response.get_data(as_text=True)
    assert "root:x:0:0" not in body and "[project]" not in body and "def load" not in body


def test_a_script_in_an_answer_or_a_file_name_shows_as_text(client: Any, described: Config) -> None:
    journal = Journal(described.state.dir)
    script_id = next(i["id"] for i in client.get("/api/images", headers=auth()).json["images"]
                     if i["path"].endswith(SCRIPT_NAME))  # fmt: skip
    path = Path(journal.rows("SELECT path FROM images WHERE rowid = ?", [script_id])[0][0])
    journal.done(path, path.stat(), None, "fp", texts={"caption": "<img src=x onerror=alert(2)> & <b>bold</b>"})
    journal.close()
    for page in ("/", f"/images/{script_id}"):
        html = client.get(page, headers=auth()).get_data(as_text=True)
        assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;b&gt;.jpg" in html, page
    grid = client.get("/", headers=auth()).get_data(as_text=True)
    assert "<img src=x" not in grid and "&lt;img src=x onerror=alert(2)&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in grid
    policy = client.get("/", headers=auth()).headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy


def test_read_only_refuses_every_change(described: Config) -> None:
    before = sorted(p.name for p in described.state.dir.iterdir())
    journal = Journal(described.state.dir, read_only=True)
    client = create_app(described, Review(described, journal), TOKEN, read_only=True).test_client()
    assert client.get("/api/images", headers=auth()).status_code == 200
    assert client.get("/thumbnails/1.jpg", headers=auth()).status_code == 200
    # issue 17.16: --read-only writes nothing — no previews, no -wal or -shm left beside the journal
    assert sorted(p.name for p in described.state.dir.iterdir()) == before, before
    for url, body in (("/api/images/1/caption", {"description": "x", "keywords": []}), ("/api/images/1/describe", {})):
        response = client.post(url, json=body, headers=auth())
        assert response.status_code == 403 and "read-only" in response.json["error"]
    journal.close()


def test_paging_and_filters(client: Any, described: Config) -> None:
    everything = ids(client, per_page=100)
    assert len(everything) == len(PHOTOS) + 1
    pages = [ids(client, per_page=2, page=n) for n in (1, 2, 3, 4)]
    assert [len(p) for p in pages] == [2, 2, 2, 0] and [i for p in pages for i in p] == everything
    assert client.get("/api/images", query_string={"per_page": 2}, headers=auth()).json["total"] == len(everything)
    assert ids(client, status="failed") == [] and len(ids(client, status="described")) == len(everything)
    assert ids(client, rule="no-such-rule") == [] and len(ids(client, rule="tags")) == len(everything)
    assert len(ids(client, folder=str(described.watch[0].path))) == len(everything)
    assert ids(client, folder="/elsewhere") == []
    assert client.get("/api/images", query_string={"status": "weird"}, headers=auth()).status_code == 400
    # The grid's "older" link starts where its page ended (no OFFSET); from there the way back is to the newest.
    html = client.get("/", query_string={"after": f"{1e12!r}:999999"}, headers=auth()).get_data(as_text=True)
    assert 'rel="first"' in html and "← newest" in html and 'rel="prev"' not in html


def test_search_is_ranked_and_marks_the_match(client: Any, described: Config, run_cli: RunCli) -> None:
    journal = Journal(described.state.dir)
    rows = journal.rows("SELECT rowid, path FROM images ORDER BY rowid")
    answers = [
        "A fox, another fox and a third fox.",
        "Snow on a mountain.",
        "A red car, a blue boat and one fox far away in the snowy hills.",
        "Café au lait on a table.",
    ]
    for (_, path), answer in zip(rows, answers, strict=False):
        journal.done(Path(path), Path(path).stat(), None, "fp", texts={"caption": answer})
    journal.close()
    listed = client.get("/api/images", query_string={"q": "fox"}, headers=auth()).json["images"]
    found = [image["path"] for image in listed]
    assert sorted(found) == sorted([rows[0][1], rows[2][1]])
    cli = run_cli("search", "--config", described.source, "fox", "--rule", "caption", "--json")
    hits = json.loads(cli.stdout)
    assert cli.returncode == 0 and [hit["path"] for hit in hits] == [rows[0][1], rows[2][1]]  # three foxes first
    assert hits[0]["snippet"] == "A [fox], another [fox] and a third [fox]."
    text = run_cli("search", "--config", described.source, "cafe")  # diacritics folded
    assert text.returncode == 0 and text.stdout.splitlines() == [rows[3][1], "  caption: [Café] au lait on a table."]
    nothing = run_cli("search", "--config", described.source, "zebra")
    assert nothing.returncode == 1 and nothing.stdout == "" and "nothing matches 'zebra'" in nothing.stderr
    odd = run_cli("search", "--config", described.source, 'fox "(', "--json")  # never an FTS5 syntax error
    assert odd.returncode == 0 and "Traceback" not in odd.stderr


def test_a_correction_is_written_into_the_photo_and_kept_by_later_runs(
    client: Any, described: Config, run_cli: RunCli
) -> None:
    listed = client.get("/api/images", headers=auth()).json["images"]
    image = next(i for i in listed if i["path"].endswith("DSCN0012.jpg"))
    path = Path(image["path"])
    model_answer = image["answers"]["caption"]
    seen = client.get(f"/api/images/{image['id']}", headers=auth()).json["caption"]["sha256"]
    body = {"description": "Grandma's 80th birthday in the garden", "keywords": ["garden", " family ", "garden", ""],
            "sha256": seen}  # fmt: skip
    saved = client.post(f"/api/images/{image['id']}/caption", json=body, headers=auth())
    assert saved.status_code == 200, saved.json
    wanted = {"description": body["description"], "keywords": ["garden", "family"], "by": "person", "title": None,
              "alt_text": None}
    assert {k: v for k, v in saved.json["caption"].items() if k != "sha256"} == wanted
    tags = exiftool.tags(path)[path]
    assert tags["XMP-dc:Description"] == body["description"] == tags["IFD0:ImageDescription"]
    assert tags["XMP-dc:Subject"] == ["garden", "family"] and "XMP-autocaption:Description" not in tags
    document = json.loads((path.parent / (path.name + ".json")).read_text(encoding="utf-8"))
    assert document["edited"]["description"] == body["description"]
    assert document["rules"]["caption"]["answer"] == model_answer  # the model's answer, kept beside it
    assert run_cli("process", "--config", described.source, path).stdout.startswith("0 images described")  # current
    forced = run_cli("process", "--force", "--config", described.source, path)
    assert forced.returncode == 0 and forced.stdout.startswith("1 image described"), forced.stdout
    assert exiftool.tags(path)[path]["XMP-dc:Description"] == body["description"]  # existing: keep
    after = json.loads((path.parent / (path.name + ".json")).read_text(encoding="utf-8"))
    assert after["written"]["description"].startswith("kept")
    fresh = saved.json["caption"]["sha256"]
    bad = client.post(f"/api/images/{image['id']}/caption", json={"description": "  ", "sha256": fresh}, headers=auth())
    assert bad.status_code == 400 and "must not be empty" in bad.json["error"]
    assert client.post(f"/api/images/{image['id']}/caption", data="x", headers=auth()).status_code == 400


def test_an_alt_text_is_corrected_alone_and_the_title_shows(client: Any, described: Config) -> None:
    listed = client.get("/api/images", headers=auth()).json["images"]
    image = next(i for i in listed if i["path"].endswith("DSCN0021.jpg"))
    path = Path(image["path"])
    subprocess.run([exiftool.require(), "-q", "-overwrite_original", "-XMP-dc:Title=Piazza Grande at noon",
                    str(path)], check=True)  # fmt: skip
    from autocaption.process import process

    assert process(described, [path]).images == 1  # the photo changed: described again, as the daemon would
    before = exiftool.tags(path)[path]
    current = client.get(f"/api/images/{image['id']}", headers=auth()).json["caption"]
    assert current["title"] == "Piazza Grande at noon" and current["alt_text"] is None
    page = client.get(f"/images/{image['id']}", headers=auth()).get_data(as_text=True)
    assert '<h1 class="title">Piazza Grande at noon</h1>' in page and 'name="alt_text"' in page
    body = {"alt_text": "A sloping square of brick and stone, with arcades", "sha256": current["sha256"]}
    saved = client.post(f"/api/images/{image['id']}/caption", json=body, headers=auth())
    assert saved.status_code == 200, saved.json
    assert saved.json["caption"]["alt_text"] == body["alt_text"]
    after = exiftool.tags(path)[path]
    assert after["XMP-iptcCore:AltTextAccessibility"] == body["alt_text"]
    # Only the alt text changed: the description and keywords the photo had stay as they were.
    for tag in ("XMP-dc:Description", "XMP-dc:Subject", "IFD0:ImageDescription", "XMP-dc:Title"):
        assert after.get(tag) == before.get(tag), tag
    assert "XMP-autocaption:AltText" not in after  # a person's: later runs keep it
    empty = {"alt_text": " ", "sha256": saved.json["caption"]["sha256"]}
    refused = client.post(f"/api/images/{image['id']}/caption", json=empty, headers=auth())
    assert refused.status_code == 400 and "alt_text must not be empty" in refused.json["error"]


def test_corrections_are_written_again_when_the_xmp_sidecar_is_lost(
    make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    from autocaption.process import process

    folder = tmp_path / "scans"
    folder.mkdir()
    tiff = folder / "Arbitro.tiff"
    shutil.copyfile(corpus / "tiff/Arbitro.tiff", tiff)
    rules = RULES + '- {name: alt, prompt: "Alt text.", max_new_tokens: 8, write: [alt_text]}\n'
    config = load(make_config(rules=rules, extra=f"watch: [{{path: {str(folder)!r}}}]"))
    assert not process(config, [folder]).failures
    journal = Journal(config.state.dir)
    try:
        client = create_app(config, Review(config, journal), TOKEN).test_client()
        image = client.get("/api/images", headers=auth()).json["images"][0]
        seen = client.get(f"/api/images/{image['id']}", headers=auth()).json["caption"]["sha256"]
        for body in ({"alt_text": "A referee with a whistle"}, {"description": "The referee of the 1998 final"}):
            saved = client.post(f"/api/images/{image['id']}/caption", json={**body, "sha256": seen}, headers=auth())
            assert saved.status_code == 200, saved.json
    finally:
        journal.close()
    document = json.loads(tiff.with_name(tiff.name + ".json").read_text(encoding="utf-8"))
    assert document["edited"]["alt_text"] == "A referee with a whistle"
    assert document["edited"]["changed"] == ["alt_text", "description"]  # not the keywords: never touched
    xmp_sidecar = tiff.with_name(tiff.name + ".xmp")
    xmp_sidecar.unlink()  # lost (a sync tool, a person tidying up)
    summary = process(config, [folder])
    assert summary.earlier == 1 and not summary.failures, summary.failures  # written again, without the model
    tags = exiftool.tags(xmp_sidecar)[xmp_sidecar]
    assert tags["XMP-dc:Description"] == "The referee of the 1998 final"
    assert tags["XMP-iptcCore:AltTextAccessibility"] == "A referee with a whistle"
    again = json.loads(tiff.with_name(tiff.name + ".json").read_text(encoding="utf-8"))["written"]
    assert again["description"] == "written: a person's correction (sidecar)" and "person" not in again["keywords"]
    assert "XMP-autocaption:AltText" not in tags and "XMP-autocaption:Description" not in tags  # the person's


def test_a_correction_with_characters_metadata_cannot_carry_is_written_readable(client: Any, described: Config) -> None:
    """A control character in an XMP packet makes it unreadable (every later write would refuse it), a lone
    surrogate cannot be encoded at all, a raw CR comes back as LF: the correction is stored without them."""
    listed = client.get("/api/images", headers=auth()).json["images"]
    image = next(i for i in listed if i["path"].endswith("DSCN0021.jpg"))
    path = Path(image["path"])
    seen = client.get(f"/api/images/{image['id']}", headers=auth()).json["caption"]["sha256"]
    body = {"description": "Grandma\x01's party\r\nin the \ud800garden\ufffe\x0c", "keywords": ["fa\x0cmily", "\x01"],
            "sha256": seen}  # fmt: skip
    saved = client.post(f"/api/images/{image['id']}/caption", json=body, headers=auth())
    assert saved.status_code == 200, saved.json
    wanted = "Grandma's party\nin the garden"
    assert saved.json["caption"]["description"] == wanted and saved.json["caption"]["keywords"] == ["family"]
    tags = exiftool.tags(path)[path]
    assert tags["XMP-dc:Description"] == wanted and tags["XMP-dc:Subject"] == "family"
    again = {"description": "Grandma's party", "sha256": saved.json["caption"]["sha256"]}
    second = client.post(f"/api/images/{image['id']}/caption", json=again, headers=auth())  # the packet reads
    assert second.status_code == 200 and exiftool.tags(path)[path]["XMP-dc:Description"] == "Grandma's party"
    blank = {"description": " \x01\u200b ", "sha256": second.json["caption"]["sha256"]}
    refused = client.post(f"/api/images/{image['id']}/caption", json=blank, headers=auth())
    assert refused.status_code == 400 and "must not be empty" in refused.json["error"]


def test_web_prints_its_url_first_and_warns_off_loopback(described: Config, tmp_path: Path) -> None:
    import urllib.request

    token_file = described.state.dir / "web-token"
    token_file.write_text("a-token-from-the-state-dir-123\n", encoding="utf-8")
    token_file.chmod(0o644)
    refused = subprocess.run([sys.executable, "-m", "autocaption", "web", "--config", str(described.source),
                              "--port", "0"], capture_output=True, text=True, env=cli_env(), timeout=60)  # fmt: skip
    assert refused.returncode == 2 and "other users can read it; chmod 600" in refused.stderr
    token_file.chmod(0o600)
    log = tmp_path / "web.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "autocaption", "web", "--config", str(described.source), "--port", "0",
         "--host", "0.0.0.0"], stdout=subprocess.PIPE, stderr=log.open("wb"), text=True, env=cli_env(),
    )  # fmt: skip
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        assert url.startswith("http://0.0.0.0:") and url.endswith("/?token=a-token-from-the-state-dir-123")
        port = url.split(":")[2].split("/")[0]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/images", headers={"Authorization": "Bearer a-token-from-the-state-dir-123"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["total"] == len(PHOTOS) + 1
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0
    warnings = [line for line in log.read_text(encoding="utf-8").splitlines() if "warning" in line]
    assert len(warnings) == 1 and "listening on 0.0.0.0" in warnings[0]


# --- a real browser ---------------------------------------------------------------------------------------

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def chromium() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        pytest.fail("chromium and chromium-driver are required (Debian packages); tests/run.sh installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def test_a_real_browser_sees_searches_opens_and_corrects(described: Config, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    server = subprocess.Popen([sys.executable, "-m", "autocaption", "web", "--config", str(described.source),
                               "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env=cli_env())  # fmt: skip
    browser = chromium()
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        browser.get(url)
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".card img")) == len(PHOTOS) + 1)
        wait.until(lambda b: all(b.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                                 for img in b.find_elements(By.CSS_SELECTOR, ".card img")))  # fmt: skip
        assert "token=" not in browser.current_url  # the cookie took over
        assert "<script>" not in browser.page_source.split("</head>")[1].split("app.js")[-1]
        assert SCRIPT_NAME in [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".card .name")]
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "review-grid.png"))

        first_answer = browser.find_element(By.CSS_SELECTOR, ".card .caption").text
        word = next(w for w in first_answer.replace(",", " ").split() if any(c.isalnum() for c in w))
        search = browser.find_element(By.NAME, "q")
        search.send_keys(word)
        search.submit()
        wait.until(ready.url_contains("q="))
        assert 1 <= len(browser.find_elements(By.CSS_SELECTOR, ".card")) <= len(PHOTOS) + 1

        browser.find_element(By.CSS_SELECTOR, ".card a.name").click()
        wait.until(ready.presence_of_element_located((By.ID, "edit")))
        # Issue 22: a small photo was shown at its own few hundred pixels; it fills its column now.
        img = browser.find_element(By.CSS_SELECTOR, ".detail figure img")
        wait.until(lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img))
        shown_width, natural, column = browser.execute_script(
            "const i = arguments[0]; return [i.getBoundingClientRect().width, i.naturalWidth,"
            " i.parentElement.getBoundingClientRect().width]", img)  # fmt: skip
        assert natural < column and shown_width >= 0.99 * column, (shown_width, natural, column)
        # Issue 17.2: the Keywords box was empty, and a save of a new description erased the photo's keywords.
        path = Path(browser.find_element(By.CSS_SELECTOR, "figcaption .path").text)
        had = exiftool.tags(path)[path]["XMP-dc:Subject"]
        had = had if isinstance(had, list) else [had]
        shown = browser.find_element(By.NAME, "keywords").get_attribute("value")
        assert had and [word.strip() for word in shown.split(",")] == [str(word) for word in had], (shown, had)
        description = browser.find_element(By.NAME, "description")
        description.clear()
        description.send_keys("Only the description changed")
        browser.find_element(By.CSS_SELECTOR, "#edit button[type=submit]").click()
        wait.until(ready.text_to_be_present_in_element((By.CSS_SELECTOR, ".message"), "Saved"))
        after = exiftool.tags(path)[path]
        assert after["XMP-dc:Description"] == "Only the description changed"
        assert after["XMP-dc:Subject"] == exiftool.tags(path)[path]["XMP-dc:Subject"] and (
            (after["XMP-dc:Subject"] if isinstance(after["XMP-dc:Subject"], list) else [after["XMP-dc:Subject"]]) == had
        )  # the keywords as they were
        description = browser.find_element(By.NAME, "description")
        description.clear()
        description.send_keys("Children on a beach at sunset")
        keywords = browser.find_element(By.NAME, "keywords")
        keywords.clear()
        keywords.send_keys("beach, sunset, children")
        browser.find_element(By.CSS_SELECTOR, "#edit button[type=submit]").click()
        wait.until(ready.text_to_be_present_in_element((By.CSS_SELECTOR, ".message"), "Saved"))
        browser.save_screenshot(str(ARTIFACTS / "review-detail.png"))
        browser.refresh()
        wait.until(ready.presence_of_element_located((By.NAME, "description")))
        assert browser.find_element(By.NAME, "description").get_attribute("value") == "Children on a beach at sunset"
        assert browser.find_element(By.NAME, "keywords").get_attribute("value") == "beach, sunset, children"
        assert "later runs keep it" in browser.find_element(By.CSS_SELECTOR, ".message").text
        tags = exiftool.tags(path)[path]
        assert tags["XMP-dc:Description"] == "Children on a beach at sunset"
        assert tags["XMP-dc:Subject"] == ["beach", "sunset", "children"]
    finally:
        browser.quit()
        server.terminate()
        server.wait(timeout=30)
    assert os.path.getsize(ARTIFACTS / "review-grid.png") > 10_000  # kept in tests/artifacts for a look


def test_corrections_are_of_the_photo_seen_and_are_found_and_shown(
    client: Any, described: Config, run_cli: RunCli, corpus: Path
) -> None:
    """Issue 17.9, 10, 13: a correction of a photo replaced since it was described is refused (409); a correction
    is what search and the grid find and show; a deleted photo is 404; odd page numbers are 400."""
    listed = client.get("/api/images", headers=auth()).json["images"]
    first, second = (next(i for i in listed if i["path"].endswith(name)) for name in ("DSCN0012.jpg", "DSCN0021.jpg"))
    seen = client.get(f"/api/images/{first['id']}", headers=auth()).json["caption"]["sha256"]
    path = Path(first["path"])
    path.write_bytes((corpus / "jpg/camera/Canon_40D.jpg").read_bytes())  # another photo under the same name
    replaced = client.post(f"/api/images/{first['id']}/caption", json={"description": "A fox", "sha256": seen},
                           headers=auth())  # fmt: skip
    assert replaced.status_code == 409 and "changed since it was described" in replaced.json["error"]
    assert "edited" not in json.loads((path.parent / (path.name + ".json")).read_text(encoding="utf-8"))

    seen = client.get(f"/api/images/{second['id']}", headers=auth()).json["caption"]["sha256"]
    saved = client.post(f"/api/images/{second['id']}/caption",
                        json={"description": "An alert heron by the lake", "sha256": seen}, headers=auth())  # fmt: skip
    assert saved.status_code == 200, saved.json
    assert ids(client, q="alert") == [second["id"]]
    card = next(i for i in client.get("/api/images", headers=auth()).json["images"] if i["id"] == second["id"])
    assert card["caption"] == "An alert heron by the lake"
    assert "An alert heron by the lake" in client.get("/", headers=auth()).get_data(as_text=True)
    found = run_cli("search", "--config", described.source, "alert")
    assert found.returncode == 0 and "correction: An [alert] heron by the lake" in found.stdout, found.stdout
    unknown = run_cli("search", "--config", described.source, "alert", "--rule", "nosuch")
    assert unknown.returncode == 2 and "--rule nosuch: no rule of that name" in unknown.stderr, unknown.stderr

    for value in ("²", "99999999999999999999", "9223372036854775807", "1.5", "-0x1"):
        for name in ("page", "per_page"):
            answer = client.get("/api/images", query_string={name: value}, headers=auth())
            assert answer.status_code == 400, (name, value, answer.status_code)
    assert client.get("/", query_string={"page": "²"}, headers=auth()).status_code == 400
    Path(second["path"]).unlink()
    gone = client.post(f"/api/images/{second['id']}/caption", json={"description": "x", "sha256": seen},
                       headers=auth())  # fmt: skip
    assert gone.status_code == 404 and "no longer there" in gone.json["error"]
    again = client.post(f"/api/images/{second['id']}/describe", headers=auth())
    assert again.status_code == 404 and "no longer there" in again.json["error"]


def test_web_names_a_bad_host_or_a_busy_port_in_one_line(described: Config, run_cli: RunCli) -> None:
    import socket

    bad = run_cli("web", "--config", described.source, "--host", "nonexist.invalid", "--port", "0", timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "nonexist.invalid" in bad.stderr, bad.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = run_cli("web", "--config", described.source, "--port", str(port), timeout=60)
    assert taken.returncode == 2 and "Traceback" not in taken.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in taken.stderr, taken.stderr


def test_concurrent_thumbnails_decode_each_photo_once_and_two_at_a_time(described: Config) -> None:
    """Issue 17.14: eight requests for the thumbnail of a 196 MP PNG decoded it eight times at once (9.2 GB)."""
    import threading
    import time

    journal = Journal(described.state.dir)
    review = Review(described, journal)
    made, running, most = [], [0], [0]
    lock = threading.Lock()
    real = review._make_preview

    def counted(path: Path, side: int) -> bytes:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            made.append(path)
        time.sleep(0.2)  # a big decode
        try:
            return real(path, side)
        finally:
            with lock:
                running[0] -= 1

    review._make_preview = counted  # type: ignore[method-assign]
    ids_ = [row[0] for row in journal.rows("SELECT rowid FROM images ORDER BY rowid")]
    requests = [ids_[0]] * 8 + ids_[1:5]
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda i=i: results.append(review.preview(i, 320))) for i in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    journal.close()
    assert len(results) == len(requests) and all(data.startswith(b"\xff\xd8") for data in results)
    assert made.count(made[0]) == 1 and len(made) == 5  # the same photo once, each other photo once
    assert most[0] <= 2


def test_a_name_that_is_not_utf8_is_shown_on_the_page_and_in_status(
    described: Config, corpus: Path, run_cli: RunCli
) -> None:
    """One such photo made every grid page it appeared on answer 500, and `status --json` a traceback."""
    folder = described.watch[0].path
    bad = folder / os.fsdecode(b"bad\xffname.jpg")
    broken = folder / os.fsdecode(b"broken\xfe.jpg")
    shutil.copyfile(corpus / "jpg/gps/DSCN0025.jpg", bad)
    broken.write_bytes(b"not a photo")
    journal = Journal(described.state.dir)
    journal.done(bad, bad.stat(), None, "fp", texts={"caption": "A heron"})
    journal.failed(broken, "broken\\xfe.jpg: not an image", transient=False, max_attempts=5, backoff=1)
    (image_id,) = journal.rows("SELECT rowid FROM images WHERE path = ?", [os.fsencode(bad)])[0]
    journal.close()
    client = create_app(described, Review(described, Journal(described.state.dir)), TOKEN).test_client()
    grid = client.get("/", headers=auth())
    assert grid.status_code == 200 and "bad\\xffname.jpg" in grid.get_data(as_text=True)
    assert client.get(f"/images/{image_id}", headers=auth()).status_code == 200
    assert client.get(f"/thumbnails/{image_id}.jpg", headers=auth()).status_code == 200
    report = run_cli("status", "--json", "--config", described.source)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["recent_errors"][0]["path"].endswith("broken\\xfe.jpg")


def test_a_replaced_answer_leaves_no_old_words_in_the_index(described: Config) -> None:
    """INSERT OR REPLACE deleted the old answer without its trigger: its words stayed in the index, and a
    photo added later under the reused row was found by them."""
    from autocaption.catalog import Catalog

    journal = Journal(described.state.dir)
    path = Path(journal.rows("SELECT path FROM images ORDER BY rowid LIMIT 1")[0][0])
    journal.done(path, path.stat(), None, "fp", texts={"caption": "a tractor in a field"})
    journal.done(path, path.stat(), None, "fp", texts={"caption": "a bicycle by a wall"})
    catalog = Catalog(journal)
    assert [hit.image.path for hit in catalog.search("bicycle")] == [path]
    assert catalog.search("tractor") == []
    assert journal.integrity() == "ok"
    assert journal.rows("INSERT INTO answers_fts (answers_fts, rank) VALUES ('integrity-check', 1)") == []
    journal.close()
