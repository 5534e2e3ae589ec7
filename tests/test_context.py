"""What a photo already says, in the prompt (issue 20, its first part): `{datetime}` and `{gps}` from EXIF, and
`{caption}` and `{keywords}` as a person (or another tool) gave them, never autocaption's own earlier answer."""

from __future__ import annotations

import json
import shutil
import subprocess
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


def _prompt(photo: Path) -> str:
    return str(json.loads(photo.with_name(photo.name + ".json").read_text())["rules"]["context"]["prompt"])


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
