"""What a photo already says, in the prompt (issue 20, its first part): `{datetime}` and `{gps}` from EXIF, and
`{caption}` and `{keywords}` as a person (or another tool) gave them, never autocaption's own earlier answer."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from autocaption.config import load
from autocaption.process import process
from tests.exiftool import require, tags

RULES = """
- name: context
  prompt: "Taken {datetime} at {gps} with {camera}. Its caption: {caption}. Its keywords: {keywords}."
  max_new_tokens: 6
  write: [description, keywords]
"""


def _prompt(photo: Path, rule: str = "context") -> str:
    return str(json.loads(photo.with_name(photo.name + ".json").read_text())["rules"][rule]["prompt"])


def test_the_prompt_holds_the_photos_own_facts_and_a_persons_words_never_ours(
    make_config: Callable[..., Path], tmp_path: Path, corpus: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    tuscany, canon = folder / "DSCN0010.jpg", folder / "Canon_40D.jpg"
    shutil.copyfile(corpus / "jpg/gps/DSCN0010.jpg", tuscany)
    shutil.copyfile(corpus / "jpg/camera/Canon_40D.jpg", canon)
    subprocess.run([require(), "-q", "-overwrite_original", "-XMP-dc:Description=Grandma's farm",
                    "-XMP-dc:Subject=farm", "-XMP-dc:Subject=Tuscany", str(tuscany)], check=True)  # fmt: skip
    config = load(make_config(RULES))
    summary = process(config, [folder])
    assert summary.images == 2 and not summary.failures, summary.failures
    # 43° 28' 2.81" N, 11° 53' 6.46" E and 2008:10:22 16:28:39, as exiftool reads them
    assert _prompt(tuscany) == ("Taken 2008-10-22 16:28:39 at 43.4674 N, 11.8851 E with NIKON COOLPIX P6000. "
                                "Its caption: Grandma's farm. Its keywords: farm, Tuscany.")  # fmt: skip
    assert _prompt(canon) == ("Taken 2008-05-30 15:56:01 at unknown with Canon EOS 40D. Its caption: unknown. "
                              "Its keywords: unknown.")  # fmt: skip
    # Now the Canon carries our answer as its caption and keywords; asked again, the prompt does not feed the
    # model its own words. The Nikon keeps the person's caption (existing: keep) and both sets of keywords.
    ours = json.loads(canon.with_name(canon.name + ".json").read_text())["rules"]["context"]["answer"]
    carried = tags(canon)[canon]
    assert ours and carried.get("XMP-dc:Description") == ours and carried.get("XMP-dc:Subject")
    summary = process(config, [folder], force=True)
    assert not summary.failures, summary.failures
    assert _prompt(canon).endswith("Its caption: unknown. Its keywords: unknown.")
    assert _prompt(tuscany).endswith("Its caption: Grandma's farm. Its keywords: farm, Tuscany.")


PLACES = """
- name: where
  prompt: "{place} | {city} | {region} | {country}"
  max_new_tokens: 4
"""


def test_place_placeholders_name_the_gps_position_and_prefer_a_persons_location(
    make_config: Callable[..., Path], tmp_path: Path, corpus: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    _where = functools.partial(_prompt, rule="where")
    arezzo, canon = folder / "DSCN0010.jpg", folder / "Canon_40D.jpg"
    cortona, siena = folder / "DSCN0012.jpg", folder / "DSCN0021.jpg"
    for photo in (arezzo, cortona, siena):
        shutil.copyfile(corpus / "jpg/gps" / photo.name, photo)
    shutil.copyfile(corpus / "jpg/camera/Canon_40D.jpg", canon)
    # A person's XMP location (a town other than the GPS's nearest, and a sub-location), and one in IPTC only.
    subprocess.run([require(), "-q", "-overwrite_original", "-XMP-photoshop:City=Cortona",
                    "-XMP-iptcCore:Location=Piazza della Repubblica", str(cortona)], check=True)  # fmt: skip
    subprocess.run([require(), "-q", "-overwrite_original", "-IPTC:City=Siena", str(siena)], check=True)
    summary = process(load(make_config(PLACES)), [folder])
    assert summary.images == 4 and not summary.failures, summary.failures
    # 43.4674 N, 11.8851 E is the middle of Arezzo (checked on a map); GeoNames' Arezzo is 0.7 km from it.
    assert _where(arezzo) == "Arezzo, Tuscany, Italy | Arezzo | Tuscany | Italy"
    assert _where(canon) == "unknown | unknown | unknown | unknown"  # no GPS, no location fields
    # The person's town wins; the GPS's region does not go with another town, its country does (Italy).
    assert _where(cortona) == "Piazza della Repubblica, Cortona, Italy | Cortona | unknown | Italy"
    assert _where(siena) == "Siena, Italy | Siena | unknown | Italy"
    # A rule that names a place writes nothing (output.location is off, and it has no `write:`).
    assert arezzo.read_bytes() == (corpus / "jpg/gps/DSCN0010.jpg").read_bytes()


def test_the_geocoder_is_loaded_only_for_rules_that_name_a_place(
    make_config: Callable[..., Path], tmp_path: Path, corpus: Path
) -> None:
    """A whole `process` run in a fresh interpreter, then its modules counted. Through a stub server on
    loopback (the remote engine): no model to load, and transformers is never imported."""
    from tests.stubserver import MODEL, stub_server

    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copyfile(corpus / "jpg/gps/DSCN0010.jpg", folder / "DSCN0010.jpg")
    script = (
        "import sys; from pathlib import Path; from autocaption.config import load; "
        "from autocaption.process import process; "
        "summary = process(load(Path(sys.argv[1])), [Path(sys.argv[2])], force=True); "
        "assert summary.images == 1 and not summary.failures, summary.failures; "
        "print(sorted(m for m in sys.modules if m in ('reverse_geocode', 'scipy.spatial', 'transformers')))"
    )
    with stub_server() as server:
        line = f"{{engine: openai, base_url: {server.base_url!r}, id: {MODEL}, max_image_side: 64, retries: 0}}"

        def loaded(rules: str) -> str:
            config = make_config(rules, model_line=line)
            run = subprocess.run([sys.executable, "-c", script, str(config), str(folder)],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            return run.stdout.strip().splitlines()[-1]

        assert loaded(RULES) == "[]"  # (nor scipy: no transformers to import it here)
        assert loaded(PLACES) == "['reverse_geocode', 'scipy.spatial']"
