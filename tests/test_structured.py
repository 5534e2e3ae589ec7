"""Structured rules (issue 19): `choice`, `list`, `json` and `when`, from the config to the photo.

Tiny random-weight models write garbage when nothing holds them, so every valid answer below is the grammar's
doing: each path (tree, batched, every family, remote) gives only answers that parse, count, keep to the
vocabulary and the exclusions, and fit the schema. The tree's constrained answers equal a plain `generate`
with the same logits processor; a gated rule is decoded from its image's one prefill.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from autocaption import config as config_module
from autocaption.config import ModelConfig, Rule, load
from autocaption.engine import Job, Prompt, load_engine
from autocaption.errors import ConfigError
from autocaption.process import process
from autocaption.structure import AnswerInvalid, Choice, JsonAnswer, Keywords, validate, vocabulary_lines
from tests.conftest import RunCli
from tests.families import FAMILIES, build
from tests.stubserver import stub_server

# Terms that share a prefix in another letter case (Dog, dogs, do), a term that is a prefix of another (red,
# Red Car; do, dogs), two words (blue sky), a term twice in two hierarchies (Dog): the traps of "distinct".
VOCABULARY = [f"Animals|{name}" for name in ("Dog", "Cat", "Horse", "Cow", "Doggo")] + [
    "Pets|dog", "dogs", "do", "Places|Beach", "Sky", "blue sky", "Tree", "red", "Red Car", "car"]  # fmt: skip
RULES = """
rules:
  - name: blurry
    prompt: "Is this photo blurry? Answer yes or no."
    choice: [yes, no]
  - name: keywords
    prompt: "Keywords for this photo."
    list: {min: 5, max: 12, words: 2, exclude: [photo, image], require: [archive]}
    max_new_tokens: 90
    write: keywords
  - name: animals
    prompt: "Which of these are in it?"
    list: {min: 2, max: 4, vocabulary: VOCAB, exclude: [Cow]}
    max_new_tokens: 40
  - name: scene
    prompt: "The scene as JSON."
    json:
      schema:
        type: object
        properties:
          light: {enum: [day, night, studio]}
          people: {type: integer, minimum: 0, maximum: 20}
          tags: {type: array, items: {enum: [sea, city, snow]}, minItems: 1, maxItems: 2}
        required: [light, people]
    max_new_tokens: 60
  - name: sharp-detail
    prompt: "What is sharpest?"
    when: {rule: blurry, is: no}
    choice: [subject, background, nothing]
"""


def _rules(tmp_path: Path, text: str = RULES) -> tuple[Rule, ...]:
    (tmp_path / "terms.txt").write_text("\n".join(VOCABULARY) + "\n", encoding="utf-8")
    path = tmp_path / "rules.yaml"
    path.write_text(text.replace("VOCAB", str(tmp_path / "terms.txt")), encoding="utf-8")
    return config_module.load(path).rules


def _prompts(rules: tuple[Rule, ...], **changes: Any) -> tuple[Prompt, ...]:
    names = {rule.name: i for i, rule in enumerate(rules)}
    return tuple(
        Prompt(rule.prompt.source, rule.max_new_tokens, structure=rule.structure, gate=rule.when,
               after=names[rule.when.rule] if rule.when else None, **changes)
        for rule in rules
    )  # fmt: skip


def _images(count: int, seed: int) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    images = []
    for i in range(count):
        width, height = 24 + int(torch.randint(0, 80, (1,), generator=generator)), 24 + 9 * i
        pixels = torch.randint(0, 255, (height, width, 3), generator=generator, dtype=torch.uint8)
        images.append(Image.fromarray(pixels.numpy(), "RGB"))
    return images


def _check(rules: tuple[Rule, ...], answers: list[list[Any]]) -> dict[str, int]:
    """Every answer valid for its rule (or skipped by its gate); how many of each rule were asked."""
    asked = dict.fromkeys((rule.name for rule in rules), 0)
    for per_image in answers:
        values: dict[str, Any] = {}
        for rule, answer in zip(rules, per_image, strict=True):
            if answer.skipped is not None:
                assert rule.when is not None and not rule.when.admits(values[rule.when.rule]), answer.skipped
                continue
            assert rule.structure is not None
            value = rule.structure.read(answer.text)  # raises AnswerInvalid: the test fails with the reason
            values[rule.name] = value
            asked[rule.name] += 1
            if isinstance(rule.structure, Keywords):
                spec = rule.structure
                assert spec.min <= len(value) <= spec.max and len({v.casefold() for v in value}) == len(value)
                assert not {v.casefold() for v in value} & {w.casefold() for w in spec.exclude}
                assert all(word in value for word in spec.require)
                assert answer.text.count(",") == len(value) - len(spec.require) - 1 or len(value) == len(spec.require)
            if isinstance(rule.structure, JsonAnswer):
                assert validate(value, rule.structure.schema_) is None
    return asked


# --- the config ------------------------------------------------------------------------------------------------


def test_structured_rules_read_into_typed_structures(tmp_path: Path) -> None:
    rules = _rules(tmp_path)
    blurry, keywords, animals, scene, detail = rules
    assert blurry.structure == Choice(("yes", "no"))  # YAML's booleans read as the words written
    assert isinstance(keywords.structure, Keywords) and keywords.structure.own_max == 11
    assert isinstance(animals.structure, Keywords)
    every = tuple(term.text for term in vocabulary_lines(VOCABULARY))
    assert animals.structure.allowed_terms() == tuple(term for term in every if term != "Cow")  # Dog and dog: one
    assert every.count("Dog") == 1 and "dog" not in every
    assert animals.structure.paths(["Dog", "Sky"]) == ("Animals|Dog", "Pets|dog")
    assert isinstance(scene.structure, JsonAnswer)
    assert scene.structure.schema_["additionalProperties"] is False  # closed: named properties only
    assert detail.when is not None and detail.when.values == ("no",)
    # what shapes the answer is in the fingerprint: a changed vocabulary describes the photo again
    changed = _rules(tmp_path, RULES.replace("exclude: [Cow]", "exclude: [Cow, Dog]"))
    assert changed[2].fingerprint != animals.fingerprint and changed[0].fingerprint == blurry.fingerprint


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ('{name: a, prompt: p, choice: [yes]}', "rules[0].choice: a choice needs at least two options"),
        ('{name: a, prompt: p, choice: [yes, no], list: {}}', "rules[0].list: a rule answers in one structure"),
        ('{name: a, prompt: p, list: {min: 5, max: 2}}', "rules[0].list.min: is more than max (2)"),
        ('{name: a, prompt: p, list: {max: 1, require: [a, b]}}', "2 required items do not fit max: 1"),
        ('{name: a, prompt: p, list: {vocabulary: [a, "b, c"]}}', "'b, c' has a comma, which separates the items"),
        ('{name: a, prompt: p, list: {vocabulary: missing.txt}}', "rules[0].list.vocabulary: cannot read the vocab"),
        ('{name: a, prompt: p, list: {min: 3, vocabulary: [a, b]}}', "has 2 usable terms, fewer than min: 3 needs"),
        ('{name: a, prompt: p, json: {schema: {type: object, oneOf: []}}}', "schema.oneOf: not supported"),
        ('{name: a, prompt: p, json: {schema: {type: string, pattern: "(?<=a)b"}}}', "cannot compile this: regex"),
        ('{name: a, prompt: p, json: {schema: {type: strin}}}', "cannot compile this: Invalid type: strin"),
        ('{name: a, prompt: p, list: {}, strip_prefixes: [x]}', "applies to free-text answers"),
        ('{name: a, prompt: p, list: {require: [dog], exclude: [Dog]}}', "list.require: 'dog' is excluded too"),
        ('{name: a, prompt: p, list: {words: 1, require: [big dog]}}', "an item has more than 1 words (words: 1)"),
        ('{name: a, prompt: p, list: {require: [dog, Dog]}}', "an item is given twice (letter case aside)"),
        ('{name: a, prompt: p, list: {require: ["a|b"]}}', "'a|b' has a '|', which separates a hierarchy's levels"),
        ('{name: a, prompt: p, list: {vocabulary: ["A||B"]}}', "rules[0].list.vocabulary: 'A||B' has an empty level"),
        ('{name: a, prompt: p, choice: ["a\\nb", c]}', "options are one line each"),
        ('{name: a, prompt: p, list: {min: 5}, max_new_tokens: 3}', "5 items need about 20 tokens; max_new_tokens is"),
        ('{name: a, prompt: p, json: {schema: {type: object}}, write: keywords}', "cannot be written as keywords"),
        ('{name: page, prompt: p, choice: [a, b]}', "'page' is a parameter of the review page's addresses"),
        ('{name: a, prompt: p, when: }', "rules[0].when: has no value"),
        ('{name: a, prompt: p, json: {schema: &s {type: object, properties: {c: *s}}}}', "the schema refers to itself"),
        ('{name: b, prompt: p, list: {vocabulary: [dog, cat]}}\n  - {name: a, prompt: p, when: {rule: b, is: fish}}',
         "'fish' is not in b's vocabulary"),
        ('{name: b, prompt: p, list: {exclude: [dog]}}\n  - {name: a, prompt: p, when: {rule: b, in: [cat, dog]}}',
         "'dog' is excluded from b's answers"),
        ('{name: a, prompt: p, when: {rule: b, is: yes}}\n  - {name: b, prompt: p, choice: [yes, no]}',
         "rules[0].when: rule 'b': the gate must be a rule above this one"),
        ('{name: b, prompt: p}\n  - {name: a, prompt: p, when: {rule: b, is: yes}}',
         "rule 'b' answers in free text; a gate needs its choice: or list:"),
        ('{name: b, prompt: p, choice: [yes, no]}\n  - {name: a, prompt: p, when: {rule: b, is: maybe}}',
         "'maybe' is not one of b's choices (yes, no)"),
        ('{name: b, prompt: p, choice: [yes, no]}\n  - {name: a, prompt: p, system: s, when: {rule: b, is: yes}}',
         "rule 'b' has another system: text; a gated rule must share it"),
    ],
)  # fmt: skip
def test_a_structure_that_cannot_work_is_a_config_error_naming_the_key(tmp_path: Path, rule: str, message: str) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(f"rules:\n  - {rule}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        config_module.load(path)
    assert message in str(caught.value) and str(caught.value).startswith(f"{path}:")


def test_what_holds_up_in_a_config_is_read_as_meant(tmp_path: Path) -> None:
    """A one-item list compiles; a json schema's `yes` and dates stay the text written (JSON's booleans are
    true and false); a list gate on a required item is fine."""
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent("""
        rules:
          - {name: one, prompt: p, list: {max: 1}, max_new_tokens: 8}
          - {name: two, prompt: p, list: {max: 2, require: [dog]}}
          - {name: j, prompt: p, json: {schema: {enum: [yes, no, 2024-01-01, true]}}}
          - {name: g, prompt: p, when: {rule: two, is: Dog}}
    """), encoding="utf-8")  # fmt: skip
    rules = config_module.load(path).rules
    assert isinstance(rules[2].structure, JsonAnswer) and rules[2].structure.schema_ == {
        "enum": ["yes", "no", "2024-01-01", True]
    }
    assert rules[0].structure is not None and rules[0].structure.read("beach") == ["beach"]


def test_answers_are_read_into_values_or_refused_with_one_line() -> None:
    assert Choice(("'80s", "'90s")).read("'80s") == "'80s"  # written as an option: taken as it is
    choice = Choice(("yes", "no"))
    assert choice.read("yes") == "yes" and choice.read(' "Yes." ') == "yes"  # a lax server's spelling
    with pytest.raises(AnswerInvalid, match="the answer 'maybe' is not one of yes, no"):
        choice.read("maybe")
    words = Keywords(min=2, max=4, exclude=("photo",), require=("archive",))
    assert words.read("dog, Dog, beach") == ["archive", "dog", "beach"]  # distinct, required first
    assert words.read('["dog", "sea"]') == ["archive", "dog", "sea"]  # a JSON array from a server
    with pytest.raises(AnswerInvalid, match="excluded item 'Photo'"):
        words.read("dog, Photo")
    with pytest.raises(AnswerInvalid, match="6 distinct items, the rule wants 2 to 4"):
        words.read("a, b, c, d, e")
    vocabulary = Keywords(min=1, max=3, vocabulary=vocabulary_lines(["Animals|Dog", "Cat"]))
    assert vocabulary.read("dog, cat") == ["Dog", "Cat"]  # the vocabulary's own spelling
    with pytest.raises(AnswerInvalid, match="'Car' is not in the vocabulary"):
        vocabulary.read("Car")
    schema = JsonAnswer({"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}, "required": ["n"]})
    assert schema.read('{"n": 2}') == {"n": 2}
    with pytest.raises(AnswerInvalid, match=r"n = 7 is outside ..3"):
        schema.read('{"n": 7}')
    with pytest.raises(AnswerInvalid, match=r"not JSON.*cut off at max_new_tokens"):
        schema.read('{"n": ')


# --- the in-process engine -------------------------------------------------------------------------------------


@pytest.mark.parametrize("share_prefix", [True, False], ids=["tree", "batched"])
def test_every_constrained_answer_is_valid_over_many_photos(
    tiny_model: Path, tmp_path: Path, share_prefix: bool
) -> None:
    """Two photo sets on the session's model and on a model of other weights (another seed: other words
    it wants to repeat)."""
    from tests.tinymodel import build_tiny

    rules = _rules(tmp_path)
    answers = []
    for model in (tiny_model, build_tiny(tmp_path / "other", seed=2)):
        engine: Any = load_engine(ModelConfig(id=str(model), batch_size=16, share_prefix=share_prefix))
        for seed in range(2):
            answers += engine.describe([Job(image, _prompts(rules)) for image in _images(6, seed)])
    asked = _check(rules, answers)
    assert asked["blurry"] == asked["keywords"] == asked["scene"] == 24
    assert asked["sharp-detail"] == sum(1 for per_image in answers if per_image[0].text == "no")


@pytest.mark.parametrize("name", FAMILIES)  # (one test per family: the workers share them out)
def test_the_grammar_holds_on_every_family(tmp_path: Path, name: str) -> None:
    rules = _rules(tmp_path)[:3]
    model = build(name, tmp_path / name)
    for share_prefix in (True, False):
        engine: Any = load_engine(ModelConfig(id=str(model), batch_size=8, share_prefix=share_prefix))
        _check(rules, engine.describe([Job(image, _prompts(rules)) for image in _images(3, 7)]))


def test_constrained_tree_decoding_equals_generate_with_the_same_logits_processor(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Each prompt alone through a plain `model.generate` with engine/grammar.py's processor: the answers the
    tree gives for all prompts of the image together."""
    from transformers import LogitsProcessorList

    from autocaption.engine.grammar import GrammarProcessor
    from tests.test_engine import reference_model

    rules = [rule for rule in _rules(tmp_path) if rule.when is None]
    engine: Any = load_engine(ModelConfig(id=str(tiny_model), batch_size=8))
    images = _images(2, 11)
    tree = engine.describe([Job(image, _prompts(tuple(rules))) for image in images])
    processor, model = reference_model(tiny_model)
    for image, answers in zip(images, tree, strict=True):
        for rule, answer in zip(rules, answers, strict=True):
            content = [{"type": "image"}, {"type": "text", "text": rule.prompt.source}]
            text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            inputs = processor(images=image, text=text, return_tensors="pt")
            masks = engine._masks([Prompt("", rule.max_new_tokens, structure=rule.structure)])
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=rule.max_new_tokens, do_sample=False,
                                     logits_processor=LogitsProcessorList(
                                         [GrammarProcessor(masks, inputs["input_ids"].shape[1])]))  # fmt: skip
            assert processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True) == answer.text


def test_a_persons_hierarchy_entry_that_matches_ours_is_never_taken_for_ours(
    make_config: Callable[..., Path], run_cli: RunCli, tmp_path: Path, corpus: Path
) -> None:
    """The photo has `Animals|Dog` from a person; our vocabulary gives the same path, then another: theirs stays."""
    import subprocess

    from tests.exiftool import require, tags

    photo = tmp_path / "photos" / "a.jpg"
    photo.parent.mkdir()
    photo.write_bytes((corpus / "jpg/camera/Canon_40D.jpg").read_bytes())
    subprocess.run([require(), "-q", "-overwrite_original", "-XMP-lr:HierarchicalSubject=Animals|Dog",
                    "-XMP-lr:HierarchicalSubject=People|Alice", str(photo)], check=True)  # fmt: skip
    for term, flags in (("Animals|Dog", ()), ("Places|Beach", ("force",))):
        config = make_config(
            f"- {{name: a, prompt: p, list: {{min: 1, max: 1, vocabulary: ['{term}']}}, write: keywords}}"
        )
        summary = process(load(config), [photo.parent], force=bool(flags))  # in-process: the CLI is tested above
        assert not summary.failures, summary.failures
    assert sorted(_listed(tags(photo)[photo], "XMP-lr:HierarchicalSubject")) == ["Animals|Dog", "People|Alice",
                                                                              "Places|Beach"]  # fmt: skip


def test_a_compiled_constrained_step_gives_the_answers_of_the_eager_one(tiny_model: Path, tmp_path: Path) -> None:
    """A constrained step runs in two halves (the forward; the choice under the masks) so the host works out
    the next masks while the device runs the forward: both halves compiled whole (inductor, fixed shapes),
    the answers of the eager step, and a second batch of the bucket compiles nothing more."""
    import torch._dynamo

    rules = tuple(rule for rule in _rules(tmp_path) if rule.when is None)
    jobs = [Job(image, _prompts(rules)) for image in _images(2, 13)]
    eager = [[a.text for a in per] for per in load_engine(ModelConfig(id=str(tiny_model), batch_size=8)).describe(jobs)]
    torch._dynamo.reset()
    engine: Any = load_engine(ModelConfig(id=str(tiny_model), batch_size=8, compile=True))
    first = [[a.text for a in per] for per in engine.describe(jobs)]
    if not engine.compile:
        pytest.skip(f"torch {torch.__version__} cannot compile this transformers' forward: decoded uncompiled")
    graphs = dict(torch._dynamo.utils.counters["stats"]).get("unique_graphs")
    assert first == eager
    assert [[a.text for a in per] for per in engine.describe(jobs[::-1])] == eager[::-1]
    assert dict(torch._dynamo.utils.counters["stats"]).get("unique_graphs") == graphs


def test_a_gated_rule_costs_no_second_prefill_and_answers_as_if_asked_alone(tiny_model: Path, tmp_path: Path) -> None:
    """Vision tower runs counted: one per image, gated rules or not. The gated answer, continued from the
    kept prefix in a second round, is the answer the same prompt gets asked in the first round."""
    text = RULES.replace("is: no", "in: [yes, no]")  # the random model's choice either way: always asked
    rules = _rules(tmp_path, text)
    engine: Any = load_engine(ModelConfig(id=str(tiny_model), batch_size=16))
    calls = []
    tower = engine.model.model.vision_tower
    handle = tower.register_forward_hook(lambda *args: calls.append(1))
    images = _images(4, 3)
    gated = engine.describe([Job(image, _prompts(rules)) for image in images])
    handle.remove()
    assert len(calls) == len(images)  # one prefill each: the gated round continued from the kept prefix
    ungated = (*_prompts(rules[:4]), Prompt(rules[4].prompt.source, 200, structure=rules[4].structure))
    plain = engine.describe([Job(image, ungated) for image in images])
    assert [[a.text for a in per] for per in gated] == [[a.text for a in per] for per in plain]
    assert all(per[4].skipped is None for per in gated)


# --- the remote engine -----------------------------------------------------------------------------------------


def test_the_remote_engine_sends_each_structure_as_a_json_schema_and_checks_the_answer(tmp_path: Path) -> None:
    rules = _rules(tmp_path)
    with stub_server() as server:
        server.mode = "structured"
        engine: Any = load_engine(ModelConfig(engine="openai", id="stub-model", base_url=server.base_url, retries=0))
        answers = engine.describe([Job(image, _prompts(rules)) for image in _images(2, 5)])
        _check(rules, answers)
        formats: list[Any] = [body.get("response_format") for body in server.bodies if "messages" in body]
        asked = {body["messages"][-1]["content"][-1]["text"]: body["response_format"]["json_schema"]["schema"]
                 for body in server.bodies if "messages" in body}  # (requests arrive in any order)  # fmt: skip
        assert asked[rules[0].prompt.source]["properties"]["answer"] == {"type": "string", "enum": ["yes", "no"]}
        assert answers[0][0].text == "yes" and answers[0][4].skipped == "blurry is not no"  # the gate, remotely
        assert len(formats) == 2 * 4  # the gated rule not asked
        engine.close()


# --- from the CLI to the photo ---------------------------------------------------------------------------------


def test_process_writes_values_to_the_sidecar_and_keywords_into_the_photo(
    make_config: Callable[..., Path], run_cli: RunCli, tmp_path: Path, corpus: Path
) -> None:
    from tests.exiftool import tags

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("Canon_40D.jpg", "Nikon_D70.jpg"):
        (photos / name).write_bytes((corpus / "jpg/camera" / name).read_bytes())
    (tmp_path / "terms.txt").write_text("\n".join(VOCABULARY), encoding="utf-8")
    config = make_config(textwrap.dedent(RULES.split("rules:\n", 1)[1]).replace("VOCAB", str(tmp_path / "terms.txt")))
    result = run_cli("process", "--config", str(config), str(photos))
    assert result.returncode == 0, result.stderr
    for photo in photos.glob("*.jpg"):
        rules = json.loads(photo.with_name(photo.name + ".json").read_text())["rules"]
        keywords = rules["keywords"]["value"]
        assert isinstance(keywords, list) and keywords[0] == "archive"
        assert rules["keywords"]["answer"] == ", ".join(keywords)
        assert isinstance(rules["scene"]["value"], dict) and rules["blurry"]["value"] in ("yes", "no")
        assert ("skipped" in rules["sharp-detail"]) == (rules["blurry"]["value"] == "yes")
        subjects = tags(photo)[photo].get("XMP-dc:Subject")
        assert (subjects if isinstance(subjects, list) else [subjects]) == keywords
    check = run_cli("check", "--config", str(config))
    assert "a list of 5-12 distinct items, each of at most 2 words, always with archive" in check.stdout
    assert "(only when blurry is no)" in check.stdout
    _search_by_values(config, photos, run_cli)


def _search_by_values(config: Path, photos: Path, run_cli: RunCli) -> None:
    """`search --where`, the API's `?rule=answer` and the page's badges and chips, from the journal `process`
    filled."""
    from autocaption.config import load
    from autocaption.journal import Journal
    from autocaption.review import Review
    from autocaption.web.app import create_app

    values = {photo.name: json.loads(photo.with_name(photo.name + ".json").read_text())["rules"]
              for photo in photos.glob("*.jpg")}  # fmt: skip
    every = run_cli("search", "--config", str(config), "--where", "keywords=ARCHIVE", "--json")
    assert sorted(Path(hit["path"]).name for hit in json.loads(every.stdout)) == sorted(values)  # each photo once
    for answer in ("yes", "no"):
        wanted = sorted(name for name, rules in values.items() if rules["blurry"]["value"] == answer)
        found = run_cli("search", "--config", str(config), "--where", f"blurry={answer}", "--json")
        assert sorted(Path(hit["path"]).name for hit in json.loads(found.stdout)) == wanted
        assert found.returncode == (0 if wanted else 1)
    first, rules = next(iter(values.items()))
    item = rules["keywords"]["value"][1]
    word = re.match(r"[^\W_]+", item)
    assert word is not None
    both = run_cli("search", "--config", str(config), word.group(), "--where", f"keywords={item}", "--json")
    hits = json.loads(both.stdout)  # words and values: the photos with both, each once
    assert first in [Path(hit["path"]).name for hit in hits] and len({hit["path"] for hit in hits}) == len(hits)
    assert all(item in values[Path(hit["path"]).name]["keywords"]["value"] for hit in hits)
    wrong = run_cli("search", "--config", str(config), "--where", "blurry=maybe")
    assert wrong.returncode == 2 and "--where blurry=maybe: blurry answers one of yes, no" in wrong.stderr
    text = run_cli("search", "--config", str(config), "--where", "scene=day")
    assert "rule scene answers in free text or JSON" in text.stderr
    loaded = load(config)
    journal = Journal(loaded.state.dir)
    try:
        client = create_app(loaded, Review(loaded, journal), "token-0123456789abcdef").test_client()
        headers = {"Authorization": "Bearer token-0123456789abcdef"}
        answer = rules["blurry"]["value"]
        listed = client.get("/api/images", query_string={"blurry": answer}, headers=headers).json["images"]
        assert first in {Path(image["path"]).name for image in listed}
        assert all(image["answers"]["blurry"] == answer for image in listed)
        assert client.get("/api/images", query_string={"blurry": "maybe"}, headers=headers).status_code == 400
        page = client.get("/", query_string={"blurry": answer}, headers=headers).get_data(as_text=True)
        assert 'class="badge"' in page and f"blurry: {answer}" in page
        image_id = next(image["id"] for image in listed if Path(image["path"]).name == first)
        shown = client.get(f"/images/{image_id}", headers=headers).get_data(as_text=True)
        assert f'<li class="chip">{rules["keywords"]["value"][0]}</li>' in shown
    finally:
        journal.close()


def test_an_answer_a_server_gives_outside_the_rule_fails_the_photo_with_one_line(
    make_config: Callable[..., Path], run_cli: RunCli, tmp_path: Path, corpus: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes((corpus / "jpg/camera/Canon_40D.jpg").read_bytes())
    before = (photos / "a.jpg").read_bytes()
    with stub_server() as server:  # "ok": the fox sentence, whatever the schema says
        model = f"{{engine: openai, id: stub-model, base_url: '{server.base_url}', retries: 0}}"
        config = make_config(
            "- {name: blurry, prompt: 'Blurry?', choice: [yes, no], write: keywords}", model_line=model
        )
        result = run_cli("process", "--config", str(config), str(photos))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "a.jpg" in line]
    why = "rule blurry: the answer 'A red fox in the snow' is not one of yes, no; nothing written"
    assert lines == [f"autocaption: error: {photos / 'a.jpg'}: {why}"], result.stderr
    assert (photos / "a.jpg").read_bytes() == before and not (photos / "a.jpg.json").exists()


def test_vocabulary_keywords_go_into_the_hierarchy_beside_a_persons(
    make_config: Callable[..., Path], run_cli: RunCli, tmp_path: Path, corpus: Path
) -> None:
    """`Parent|Child` vocabulary lines: the item is written to dc:subject, its paths to lr:hierarchicalSubject
    (made when the photo has none), a person's hierarchy kept, and the next run's paths replace ours only."""
    import subprocess

    from tests.exiftool import require, tags

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes((corpus / "jpg/camera/Canon_40D.jpg").read_bytes())
    (photos / "b.jpg").write_bytes((corpus / "jpg/camera/Nikon_D70.jpg").read_bytes())
    subprocess.run([require(), "-q", "-overwrite_original", "-XMP-lr:HierarchicalSubject=People|Anna",
                    "-XMP-dc:Subject=Anna", str(photos / "b.jpg")], check=True)  # fmt: skip
    (tmp_path / "terms.txt").write_text("\n".join(VOCABULARY), encoding="utf-8")
    terms_file = tmp_path / "terms.txt"
    config = make_config(f"- {{name: animals, prompt: Animals, list: {{min: 2, max: 3, vocabulary: '{terms_file}'}}, "
                         "write: keywords}")  # fmt: skip
    assert not process(load(config), [photos]).failures  # in-process: the CLI's own run is tested above
    terms = {term.text: term.paths for term in vocabulary_lines(VOCABULARY)}
    for photo, theirs in ((photos / "a.jpg", []), (photos / "b.jpg", ["People|Anna"])):
        value = json.loads(photo.with_name(photo.name + ".json").read_text())["rules"]["animals"]["value"]
        found = tags(photo)[photo]
        assert _listed(found, "XMP-dc:Subject") == ["Anna"] * bool(theirs) + value
        ours = [path for item in value for path in terms[item]] + [item for item in value if not terms[item]]
        assert sorted(_listed(found, "XMP-lr:HierarchicalSubject")) == sorted(theirs + ours)
    # the vocabulary loses its hierarchy: our paths go, the person's stay
    terms_file.write_text("\n".join(line.rsplit("|", 1)[-1] for line in VOCABULARY), encoding="utf-8")
    assert not process(load(config), [photos], force=True).failures
    for photo, theirs in ((photos / "a.jpg", []), (photos / "b.jpg", ["People|Anna"])):
        value = json.loads(photo.with_name(photo.name + ".json").read_text())["rules"]["animals"]["value"]
        assert sorted(_listed(tags(photo)[photo], "XMP-lr:HierarchicalSubject")) == sorted(theirs + value)


def _listed(found: dict[str, Any], name: str) -> list[Any]:
    """exiftool's JSON gives a one-item list as the item."""
    value = found.get(name)
    return value if isinstance(value, list) else [value]
