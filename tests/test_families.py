"""Every family in the table of docs/models.md, as a tiny random-weight model built locally (tests/families.py) and
loaded through the product's real `from_pretrained` path: `process` end to end (the command line for the
default family, in-process for the rest) on corpus photos of different sizes and aspect ratios with three
rules, every answer equal to a plain one-image, one-prompt `generate` with the same chat template (greedy,
float32, the same decoded pixels), batched equal to one-at-a-time. Then what is refused: a model too big for
the free memory, remote code, a system turn for a template without one."""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from autocaption.config import ModelConfig
from autocaption.engine import families as known
from autocaption.engine import load_engine
from autocaption.errors import ModelUnavailable
from autocaption.images import open_picture
from autocaption.textclean import clean_answer
from tests.conftest import RunCli
from tests.families import FAMILIES, build

PHOTOS = [
    "jpg/gps/DSCN0010.jpg",
    "jpg/orientation/portrait_6.jpg",
    "jpg/camera/Canon_40D.jpg",
    "jpg/large/Reconyx_HC500_Hyperfire.jpg",
]  # fmt: skip  4:3, upright portrait, 3:2, 16:9
RULES = [
    {"name": "caption", "prompt": "Describe this photo.", "max_new_tokens": 12},
    {"name": "keywords", "prompt": "Keywords, comma separated.", "max_new_tokens": 8, "system": "Be terse."},
    {"name": "decade", "prompt": "Which decade?", "max_new_tokens": 5},
]
NESTED = {name for name, family in known.FAMILIES.items() if family.nested_images}


@pytest.fixture(scope="session")
def family_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    @functools.cache
    def make(name: str) -> Path:
        return build(name, tmp_path_factory.mktemp("families") / name)

    return make


@functools.cache
def reference_model(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoProcessor.from_pretrained(folder), AutoModelForImageTextToText.from_pretrained(folder).eval()


def reference(folder: Path, name: str, image: Any, rule: dict[str, Any]) -> str:
    """A plain one-image, one-prompt `model.generate` with the processor's chat template, greedy."""
    import torch

    processor, model = reference_model(folder)
    conversation: list[dict[str, Any]] = []
    if rule.get("system"):
        conversation.append({"role": "system", "content": [{"type": "text", "text": rule["system"]}]})
    conversation.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rule["prompt"]}]})
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    bos = processor.tokenizer.bos_token
    inputs = processor(images=[[image]] if name in NESTED else [image], text=[text], return_tensors="pt",
                       add_special_tokens=not (bos and text.startswith(bos)))  # fmt: skip
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=rule["max_new_tokens"], do_sample=False)
    return str(processor.tokenizer.decode(output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_end_to_end_equals_plain_generate(
    name: str, family_model: Callable[[str], Path], run_cli: RunCli, make_config: Callable[..., Path], corpus: Path,
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    from autocaption.config import load
    from autocaption.process import process

    caplog.set_level(logging.INFO, logger="autocaption")
    folder = family_model(name)
    path = "tree decoding" if known.FAMILIES[name].tree else "batched decoding"
    results = {}
    for batch_size in (8, 1):
        photos = tmp_path / f"batch{batch_size}"
        photos.mkdir()
        for source in PHOTOS:
            shutil.copyfile(corpus / source, photos / Path(source).name)
        rules = "\n".join(f"- {json.dumps(rule)}" for rule in RULES)
        config = make_config(rules=rules, model_line=f"{{id: {str(folder)!r}, batch_size: {batch_size}}}")
        if batch_size == 8 and name == "llava_next":  # the real command line, end to end, for the default
            result = run_cli("process", "--config", config, photos)
            assert result.returncode == 0, result.stderr
            assert result.stdout.startswith(f"{len(PHOTOS)} images described, {len(PHOTOS) * len(RULES)} answers")
            assert f"({known.FAMILIES[name].label}): {path}" in result.stderr, result.stderr
        else:  # in-process: what the command line adds is the same for every family, and costs ~5 s to start
            caplog.clear()
            summary = process(load(config), [photos])
            assert summary.images == len(PHOTOS) and not summary.failures, summary.failures
            assert f"({known.FAMILIES[name].label}): {path}" in caplog.text, caplog.text
        results[batch_size] = {
            source: json.loads((photos / (Path(source).name + ".json")).read_text(encoding="utf-8"))["rules"]
            for source in PHOTOS
        }
    from transformers import AutoProcessor

    side = known.max_image_side(AutoProcessor.from_pretrained(folder))
    for source in PHOTOS:
        picture = open_picture(corpus / source, max_pixels=10**9, draft_side=side)  # what the product decoded
        for rule in RULES:
            expected = clean_answer(reference(folder, name, picture.image, rule))
            for batch_size in (8, 1):  # batched and one at a time: the same answers
                assert results[batch_size][source][rule["name"]]["answer"] == expected, (name, source, rule, batch_size)


def test_a_model_too_big_for_the_free_memory_is_refused_before_loading(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autocaption.engine import loading

    monkeypatch.setattr(loading, "memory_free", lambda device: 200_000)  # bytes: a stated, tiny amount
    monkeypatch.setattr(loading.AutoModelForImageTextToText, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded before the memory check"))  # fmt: skip
    with pytest.raises(ModelUnavailable) as info:
        load_engine(ModelConfig(id=str(tiny_model)))
    message = str(info.value)
    assert message.startswith(f"model {str(tiny_model)!r} needs about ") and "GiB are free" in message
    assert "no suggested model fits" in message


def test_suggestions_fit_the_stated_free_memory() -> None:
    from autocaption.engine.memory import GiB, Need, too_big

    message = too_big("llava-hf/llava-v1.6-mistral-7b-hf", Need(15 * GiB, GiB, 7_500_000_000), 12 * GiB, "cuda:0")
    assert "needs about 17.0 GiB on cuda:0" in message and "12.0 GiB are free" in message
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in message and "Qwen/Qwen2.5-VL-7B-Instruct" not in message


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        ({"model_type": "minicpmv", "auto_map": {"AutoModel": "modeling_minicpmv.MiniCPMV"}},
         "MiniCPM-V needs code from its own repository (trust_remote_code)"),
        ({"model_type": "brand_new_vlm", "auto_map": {"AutoModel": "modeling.New"}},
         "brand_new_vlm needs code from its own repository"),
        ({"model_type": "florence2"}, "Florence-2 takes task tokens"),
        ({"model_type": "bert"}, "is not an image-text-to-text model"),
    ],
)  # fmt: skip
def test_what_cannot_run_in_process_is_one_clear_line(tmp_path: Path, settings: dict[str, Any], said: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(settings), encoding="utf-8")
    with pytest.raises(ModelUnavailable, match=re.escape(said)):
        load_engine(ModelConfig(id=str(folder)))


def test_a_system_text_for_a_template_without_one_names_the_rule(
    tiny_model: Path, run_cli: RunCli, make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    folder = shutil.copytree(tiny_model, tmp_path / "no-system")
    template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    (folder / "chat_template.jinja").write_text(  # like templates that refuse a system role
        template.replace("{% if message['role'] == 'system' %}", "{% if message['role'] == 'system' %}"
                         "{{ raise_exception('Only user and assistant roles are supported!') }}"),
        encoding="utf-8",
    )  # fmt: skip
    photo = tmp_path / "a.jpg"
    photo.write_bytes((corpus / "jpg/gps/DSCN0010.jpg").read_bytes())
    rules = '- {name: caption, prompt: "Describe."}\n- {name: tags, prompt: "Keywords.", system: "Be terse."}'
    config = make_config(rules=rules, model=str(folder))
    result = run_cli("process", "--config", config, photo)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [
        f"autocaption: error: {config}:6: rules[1].system: the chat template of {folder} has no system turn; move "
        "this text into the prompt, or choose a model whose template has one"
    ], result.stderr


def test_a_family_whose_processor_needs_a_missing_package_says_which() -> None:
    from autocaption.engine.loading import _check_packages

    family = known.Family("future_vlm", "Future-VL", tree=False, needs=("autocaption_no_such_package",))
    with pytest.raises(ModelUnavailable, match=r"Future-VL's processor needs autocaption_no_such_package, which is "
                       r"not installed: pip install autocaption_no_such_package$"):  # fmt: skip
        _check_packages(family)


def test_a_large_model_on_the_cpu_says_how_slow_its_first_batch_was(
    tiny_model: Path, corpus: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from autocaption.engine import Job, Prompt

    engine: Any = load_engine(ModelConfig(id=str(tiny_model)))
    engine._report_cpu_speed, engine.parameters = True, 7_600_000_000  # as a 7B model would set them
    picture = open_picture(corpus / "jpg/gps/DSCN0010.jpg", max_pixels=10**9)
    with caplog.at_level(logging.WARNING):
        engine.describe([Job(picture.image, (Prompt("Describe.", 4),))])
        engine.describe([Job(picture.image, (Prompt("Describe.", 4),))])
    said = [r.getMessage() for r in caplog.records if "s per answer in its first batch" in r.getMessage()]
    assert len(said) == 1 and "(7.6 B parameters)" in said[0]


@pytest.mark.parametrize("layers", ["mixed", "all sliding"])
def test_gemma3_prompts_longer_than_its_window_equal_plain_generate(layers: str, tmp_path: Path, corpus: Path) -> None:
    """Issue 17.12: a tiny Gemma 3 with a 32-token window and prompts that cross it, one prompt per batch and
    four: the tree path (every layer windowed: the tree mask applies the window) and the batched path (mixed
    layers past the window) both answer what a plain `generate` answers."""
    from transformers import AutoProcessor

    from autocaption.config import ModelConfig
    from autocaption.engine import Job, Prompt, load_engine

    folder = build("gemma3", tmp_path / "gemma3")
    settings = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    settings["text_config"]["sliding_window"] = 32
    if layers == "all sliding":
        settings["text_config"]["layer_types"] = ["sliding_attention", "sliding_attention"]
    (folder / "config.json").write_text(json.dumps(settings), encoding="utf-8")
    rules = [{"name": "long", "prompt": "Describe this photo in great detail, every part of it, please.",
              "max_new_tokens": 20}, {"name": "short", "prompt": "Which decade?", "max_new_tokens": 12}]  # fmt: skip
    side = known.max_image_side(AutoProcessor.from_pretrained(folder))
    pictures = [open_picture(corpus / source, max_pixels=10**9, draft_side=side) for source in PHOTOS]
    prompts = tuple(Prompt(rule["prompt"], rule["max_new_tokens"]) for rule in rules)
    expected = [[reference(folder, "gemma3", p.image, rule) for rule in rules] for p in pictures]
    for batch_size in (1, 4):
        engine = load_engine(ModelConfig(id=str(folder), batch_size=batch_size))
        answers = engine.describe([Job(p.image, prompts) for p in pictures])
        assert [[a.text for a in per_image] for per_image in answers] == expected, (layers, batch_size)
        # the tree path (a step over the shared prefill) or the batched one past the window; which one a release
        # takes differs (transformers 5.5 takes the batched path for all-sliding layers): the answers may not
        assert "decode" in engine.timings or "prefill+decode" in engine.timings, engine.timings


def test_a_photo_the_processor_cannot_take_fails_alone(
    family_model: Callable[[str], Path], make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    """Issue 25.2: Qwen2-VL's processor raised "absolute aspect ratio must be smaller than 200" for a 10000x20
    photo: the worker died (and again at every restart), and the good photos of its batch were not described."""
    from PIL import Image

    from autocaption.config import load
    from autocaption.process import process

    folder = tmp_path / "photos"
    folder.mkdir()
    for source in PHOTOS[:2]:
        shutil.copyfile(corpus / source, folder / Path(source).name)
    Image.new("RGB", (10000, 20), (40, 90, 160)).save(folder / "panorama.png")
    rules = "\n".join(f"- {json.dumps(rule)}" for rule in RULES[:1])
    config = make_config(rules=rules, model_line=f"{{id: {str(family_model('qwen2_vl'))!r}, batch_size: 8}}")
    summary = process(load(config), [folder])
    assert summary.images == 2, summary
    assert len(summary.failures) == 1 and "panorama.png" in summary.failures[0]
    assert "processor cannot take this image (10000x20)" in summary.failures[0], summary.failures
