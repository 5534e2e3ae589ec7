"""The transformers engine on the tiny local model: parity with plain `generate`, placement, errors."""

from __future__ import annotations

import functools
import logging
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from autocaption.config import ModelConfig
from autocaption.engine import Job, Prompt, load_engine
from autocaption.engine.devices import Accelerator, place
from autocaption.errors import ModelUnavailable
from autocaption.images import open_picture
from tests.conftest import RunCli

IMAGES = [  # different sizes and aspect ratios: different image token counts
    "jpg/camera/Canon_40D.jpg",
    "jpg/gps/DSCN0010.jpg",
    "jpg/orientation/portrait_6.jpg",
    "jpg/camera/Fujifilm_FinePix_E500.jpg",
    "jpg/invalid/image01980.jpg",
]
PROMPTS = (Prompt("Describe this photo.", 20), Prompt("Keywords, comma separated.", 12, system="Be terse."))


@functools.cache
def reference_model(model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    return AutoProcessor.from_pretrained(model_dir), LlavaNextForConditionalGeneration.from_pretrained(model_dir).eval()


def reference_generate(model_dir: Path, image: object, prompt: Prompt) -> str:
    """A plain one-image, one-prompt `model.generate` with the processor's chat template, greedy."""

    processor, model = reference_model(model_dir)
    conversation = []
    if prompt.system:
        conversation.append({"role": "system", "content": [{"type": "text", "text": prompt.system}]})
    conversation.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt.text}]})
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=prompt.max_new_tokens, do_sample=False)
    return str(processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


EXTRA = (Prompt("Which decade?", 6), Prompt("Colours?", 9), Prompt("Any text visible?", 7, system="Be terse."))


@pytest.mark.parametrize("share_prefix", [True, False], ids=["prefix-shared", "plain"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_answers_equal_plain_generate(
    tiny_model: Path, corpus: Path, batch_size: int, share_prefix: bool
) -> None:
    engine = load_engine(ModelConfig(id=str(tiny_model), batch_size=batch_size, share_prefix=share_prefix))
    pictures = [open_picture(corpus / name, max_pixels=10**9, draft_side=engine.info.max_image_side)
                for name in IMAGES]  # fmt: skip
    # Different rules per image: 2 to 5 prompts, some with a system turn, different answer lengths.
    prompt_sets = [PROMPTS + EXTRA[: i % 4] for i in range(len(pictures))]
    answers = engine.describe([Job(p.image, prompts) for p, prompts in zip(pictures, prompt_sets, strict=True)])
    token_counts = set()
    for picture, prompts, per_image in zip(pictures, prompt_sets, answers, strict=True):
        for prompt, answer in zip(prompts, per_image, strict=True):
            assert answer.text == reference_generate(tiny_model, picture.image, prompt)
            assert 0 < answer.new_tokens <= prompt.max_new_tokens and answer.seconds > 0
            token_counts.add(answer.prompt_tokens)
    assert len(token_counts) > 2  # the images really had different token counts


def test_out_of_memory_splits_the_batch_and_loses_nothing(
    tiny_model: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A forward pass over more than one image raises CUDA's out-of-memory error (as a GPU would on a
    batch too big for it): the batch is retried in halves down to one image and every answer comes; the
    next batches are packed smaller, and grow back after `grow_after` batches went through."""

    pictures = [open_picture(corpus / name, max_pixels=10**9, draft_side=64) for name in IMAGES[:4]]
    jobs = [Job(p.image, PROMPTS + EXTRA[:1]) for p in pictures]  # 2 units per image: with/without system
    expected = [[a.text for a in r] for r in load_engine(ModelConfig(id=str(tiny_model), batch_size=12)).describe(jobs)]
    engine: Any = load_engine(ModelConfig(id=str(tiny_model), batch_size=12))
    forward = engine.model.forward
    refused = []

    def small_gpu(*args: Any, **kwargs: Any) -> Any:
        if kwargs["input_ids"].shape[0] > 1:
            refused.append(kwargs["input_ids"].shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", small_gpu)
    with caplog.at_level("WARNING"):
        assert [[a.text for a in r] for r in engine.describe(jobs)] == expected
    assert refused == [8, 4, 2, 2, 4, 2, 2]  # 8 units -> 4 + 4 -> 2 + 2 -> 1 + 1 (depth first)
    # Each refusal dropped the decode states kept for bigger batches: only the one-image state is left.
    assert {rows for rows, _ in engine.tree.states} == {1}
    warnings = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(warnings) == 1 and "batch of 12 prompts" in warnings[0]
    assert engine.rows_limit == 1
    engine.grow_after = 3
    assert [[a.text for a in r] for r in engine.describe(jobs)] == expected
    assert len(refused) == 7  # packed one unit per batch: nothing refused; 8 batches went through
    assert engine.rows_limit == 4  # 1 -> 2 -> 4 after 3 and 6 batches
    assert [[a.text for a in r] for r in engine.describe(jobs)] == expected
    assert len(refused) > 7  # grown back into the limit: split again, still every answer


def test_tree_decoding_with_eager_attention_equals_plain_generate(tiny_model: Path, corpus: Path) -> None:
    """eager takes the tree's additive 4D mask as sdpa does (it adds it to the scores)."""
    engine = load_engine(ModelConfig(id=str(tiny_model), batch_size=6, attn_implementation="eager"))
    pictures = [open_picture(corpus / name, max_pixels=10**9, draft_side=64) for name in IMAGES[:3]]
    prompts = PROMPTS + EXTRA[:2]
    answers = engine.describe([Job(p.image, prompts) for p in pictures])
    assert engine.timings["decode"] > 0  # the tree path ran
    for picture, per_image in zip(pictures, answers, strict=True):
        for prompt, answer in zip(prompts, per_image, strict=True):
            assert answer.text == reference_generate(tiny_model, picture.image, prompt)


def test_tree_decoding_honours_the_sliding_window(tmp_path: Path, corpus: Path) -> None:
    """Branches are numbered as if each came straight after the prefix, so Mistral's attention window
    must cut off the same tokens it cuts off in a one-prompt `generate`. The window (90) is longer than
    the prefix (~75 tokens) and shorter than prompt + answer, so it bites during decoding."""
    from tests.tinymodel import build_tiny

    windowed = build_tiny(tmp_path / "windowed", sliding_window=90)
    unlimited = build_tiny(tmp_path / "unlimited")  # same seed: the same weights
    engine = load_engine(ModelConfig(id=str(windowed), batch_size=8))
    pictures = [open_picture(corpus / name, max_pixels=10**9, draft_side=64) for name in IMAGES[:3]]
    prompts = (Prompt("Describe this photo.", 24), Prompt("Which decade?", 30), Prompt("Colours?", 18))
    answers = engine.describe([Job(p.image, prompts) for p in pictures])
    assert engine.timings["decode"] > 0 and "prefill+decode" not in engine.timings  # the tree path ran
    differs = False
    for picture, per_image in zip(pictures, answers, strict=True):
        for prompt, answer in zip(prompts, per_image, strict=True):
            expected = reference_generate(windowed, picture.image, prompt)
            assert answer.text == expected
            differs |= expected != reference_generate(unlimited, picture.image, prompt)
    assert differs  # the window changed some answer: the test can see a mask that ignores it


def test_grouped_sdpa_equals_sdpa_with_repeated_heads() -> None:
    from transformers.integrations.sdpa_attention import repeat_kv

    from autocaption.engine.tree import grouped_sdpa

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups = 4  # type: ignore[assignment]
    query, key, value = torch.randn(3, 8, 5, 16), torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    allowed = torch.rand(3, 1, 5, 40) > 0.5
    allowed[..., 0] = True
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    output, _ = grouped_sdpa(module, query, key, value, mask, scaling=0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, 4), repeat_kv(value, 4), attn_mask=mask, scale=0.25
    ).transpose(1, 2)
    assert output.shape == (3, 5, 8, 16)
    torch.testing.assert_close(output, expected)


def test_prompt_uses_the_processors_chat_template(tiny_model: Path) -> None:
    engine = load_engine(ModelConfig(id=str(tiny_model)))
    assert engine.render(Prompt("What is this?", 5)) == "[INST] <image>\nWhat is this? [/INST]"  # type: ignore[attr-defined]
    with_system = engine.render(Prompt("What?", 5, system="Answer briefly."))  # type: ignore[attr-defined]
    assert with_system.startswith("<<SYS>>\nAnswer briefly.\n<</SYS>>")


def test_cpu_placement_and_info(tiny_model: Path) -> None:
    engine = load_engine(ModelConfig(id=str(tiny_model)))
    assert (engine.info.device, engine.info.dtype, engine.info.backend) == ("cpu", "float32", "transformers")
    assert engine.info.max_image_side == 64


@pytest.mark.parametrize(
    ("device", "dtype", "acc", "expected"),
    [
        ("auto", "auto", Accelerator(0, None, None, False), ("cpu", "float32")),
        ("auto", "auto", Accelerator(1, "6.2.41133", None, True, ("AMD Instinct MI210",)), ("cuda:0", "bfloat16")),
        ("cuda:1", "auto", Accelerator(2, None, "12.8", False, ("T4", "T4")), ("cuda:1", "float16")),
        ("cpu", "auto", Accelerator(1, None, "12.8", True, ("H100",)), ("cpu", "float32")),
        ("auto", "float16", Accelerator(1, None, "12.8", True, ("H100",)), ("cuda:0", "float16")),
    ],
)
def test_device_and_dtype_choice(device: str, dtype: str, acc: Accelerator, expected: tuple[str, str]) -> None:
    placement = place(device, dtype, acc)
    assert (placement.device, placement.dtype) == expected


def test_rocm_and_cuda_are_named_in_the_description() -> None:
    rocm = place("auto", "auto", Accelerator(1, "6.2.41133", None, True, ("AMD Radeon RX 7900 XTX",)))
    assert rocm.description == "cuda:0 (AMD Radeon RX 7900 XTX, ROCm 6.2.41133)"
    cuda = place("auto", "auto", Accelerator(1, None, "12.8", True, ("NVIDIA H100",)))
    assert cuda.description == "cuda:0 (NVIDIA H100, CUDA 12.8)"
    assert place("auto", "auto", Accelerator(0, None, None, False)).warning


def test_the_cpu_warning_says_what_to_do_for_the_torch_build_present() -> None:
    """A CUDA build on a machine without a GPU was told to install the CUDA build (issue 22)."""
    cuda = place("auto", "auto", Accelerator(0, None, "13.0", False)).warning or ""
    assert "torch is a CUDA 13.0 build" in cuda and "nvidia-smi" in cuda and "install" not in cuda
    rocm = place("auto", "auto", Accelerator(0, "6.2.41133", None, False)).warning or ""
    assert "ROCm 6.2.41133 build" in rocm and "/dev/kfd" in rocm and "install" not in rocm
    cpu = place("auto", "auto", Accelerator(0, None, None, False)).warning or ""
    assert "CPU-only build" in cpu and "install torch's ROCm or CUDA build" in cpu
    assert place("cpu", "auto", Accelerator(0, None, None, False)).warning is None  # asked for: nothing to say


def test_missing_gpu_index_is_a_clear_error() -> None:
    with pytest.raises(ModelUnavailable, match="HIP_VISIBLE_DEVICES"):
        place("cuda:3", "auto", Accelerator(1, "6.2", None, True, ("MI210",)))


def test_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="no such model folder"):
        load_engine(ModelConfig(id=str(tmp_path / "missing")))


def test_a_model_not_cached_with_downloads_off_is_one_line_and_exit_2(
    run_cli: RunCli, make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    photo = tmp_path / "a.jpg"
    photo.write_bytes((corpus / "jpg/gps/DSCN0010.jpg").read_bytes())
    config = make_config(model="llava-hf/llava-v1.6-mistral-7b-hf")
    result = run_cli("process", "--config", config, photo, env={"HF_HOME": str(tmp_path / "hf")})  # HF_HUB_OFFLINE=1
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "not in the local cache" in errors[0] and "downloading is off" in errors[0]
    assert "local model folder in model.id" in errors[0]


def test_a_checkpoint_with_missing_weights_is_refused_before_any_photo(
    run_cli: RunCli, make_config: Callable[..., Path], tiny_model: Path, corpus: Path, tmp_path: Path
) -> None:
    """Issue 17.3: transformers initialised the missing tensors at random and the model wrote nonsense into the
    photos with exit 0."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(tiny_model, tmp_path / "broken-model")
    weights = load_file(broken / "model.safetensors")
    dropped = sorted(name for name in weights if "layers.0.mlp" in name)
    save_file({name: t for name, t in weights.items() if name not in dropped}, broken / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    photo = tmp_path / "a.jpg"
    photo.write_bytes((corpus / "jpg/gps/DSCN0010.jpg").read_bytes())
    before = photo.read_bytes()
    result = run_cli("process", "--config", make_config(model=str(broken)), photo)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert f"the checkpoint in {broken} lacks" in errors[0] and f"({len(dropped)} tensor(s))" in errors[0]
    assert photo.read_bytes() == before and not (tmp_path / "a.jpg.json").exists()


def test_a_model_folder_without_tokenizer_files_says_so(tiny_model: Path, tmp_path: Path) -> None:
    """Issue 17.16: it said "install sentencepiece"."""
    import shutil

    folder = shutil.copytree(tiny_model, tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ModelUnavailable, match="has no tokenizer files") as raised:
        load_engine(ModelConfig(id=str(folder)))
    assert "sentencepiece" not in str(raised.value)


def closed_port() -> int:
    with socket.socket() as sock:  # bound, never listening: connections are refused at once
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_first_run_without_network_says_so_in_one_line_within_seconds(
    run_cli: RunCli, make_config: Callable[..., Path], corpus: Path, tmp_path: Path
) -> None:
    """Without the model in the cache and without a reachable hub: one clear line, not minutes of retries
    with every warning printed twice (issue 13.10)."""
    photo = tmp_path / "a.jpg"
    photo.write_bytes((corpus / "jpg/gps/DSCN0010.jpg").read_bytes())
    config = make_config(model="llava-hf/llava-v1.6-mistral-7b-hf")
    env: dict[str, str | None] = {
        "HF_HUB_OFFLINE": None, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
    }  # fmt: skip
    started = time.monotonic()
    result = run_cli("process", "--config", config, photo, env=env)
    seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr
    assert seconds < 30, seconds  # ~6 s of it is importing torch; the old behaviour took minutes
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "not in the local cache" in errors[0] and "cannot be reached" in errors[0]
    lines = result.stderr.splitlines()
    assert len(lines) == len(set(lines)), result.stderr  # no line printed twice
    assert "Retrying" not in result.stderr


def test_a_cached_hub_model_loads_without_the_network(
    run_cli: RunCli, make_config: Callable[..., Path], tiny_model: Path, corpus: Path, tmp_path: Path
) -> None:
    """A hub id whose files are in the Hugging Face cache is used from there without asking the hub."""
    snapshot = tmp_path / "hf" / "hub" / "models--local--tiny-llava" / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_model, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(snapshot.name, encoding="utf-8")
    photo = tmp_path / "a.jpg"
    photo.write_bytes((corpus / "jpg/gps/DSCN0010.jpg").read_bytes())
    env: dict[str, str | None] = {
        "HF_HUB_OFFLINE": None, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
    }  # fmt: skip
    result = run_cli("process", "--config", make_config(model="local/tiny-llava"), photo, env=env)
    assert result.returncode == 0, result.stderr
    assert "1 image described" in result.stdout and "downloading" not in result.stderr


class HubStub:
    """The Hugging Face hub's file endpoints on loopback, as huggingface_hub asks them (HEAD for the commit,
    ETag and size, then GET): a model's config.json and, for `index` bytes, its safetensors index; every
    other file is missing (404, EntryNotFound) except a single `model.safetensors` of `single` bytes, whose
    size a HEAD tells (it has no body to give: a download of it fails the test). Records every request."""

    def __init__(self, config: bytes, *, index: int | None = None, single: int | None = None) -> None:
        import http.server
        import json
        import threading

        files = {"config.json": config}
        if index is not None:
            files["model.safetensors.index.json"] = json.dumps(
                {"metadata": {"total_size": index}, "weight_map": {"lm_head.weight": "model-00001.safetensors"}}
            ).encode()
        self.requests: list[str] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body: bool) -> None:
                stub.requests.append(f"{self.command} {self.path}")
                name = self.path.split("/resolve/", 1)[-1].split("/", 1)[-1] if "/resolve/" in self.path else ""
                if self.path.startswith("/api/models"):
                    data, status = b"[]", 200
                elif name in files:
                    data, status = files[name], 200
                elif name == "model.safetensors" and single is not None and not body:
                    self.send_response(200)
                    self.send_header("X-Repo-Commit", "a" * 40)
                    self.send_header("ETag", '"weights"')
                    self.send_header("X-Linked-Size", str(single))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                else:
                    data, status = b"Entry not found", 404
                self.send_response(status)
                self.send_header("X-Repo-Commit", "a" * 40)
                self.send_header("ETag", f'"{hash(data) & 0xFFFFFFFF:x}"')
                if status == 404:
                    self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("layout", ["index", "single file"])
def test_a_model_too_big_for_this_machine_is_refused_before_its_weights_are_downloaded(
    run_cli: RunCli, make_config: Callable[..., Path], tiny_model: Path, corpus: Path, tmp_path: Path, layout: str
) -> None:
    """The default 15 GB model on a 24 GB CPU machine: the memory check ran only after the download (issue 22).
    Now the hub's listing of the weights is read first (its index, or the size of one file) and a model
    that cannot fit is one line, exit 2, naming the models that would; no weight and no processor file is
    fetched."""
    size = 400 * 2**30  # more than any machine that runs these tests has
    hub = HubStub((tiny_model / "config.json").read_bytes(), **({"index": size} if layout == "index" else
                                                                 {"single": size}))  # fmt: skip
    photo = tmp_path / "a.jpg"
    photo.write_bytes((corpus / "jpg/gps/DSCN0010.jpg").read_bytes())
    env: dict[str, str | None] = {"HF_HUB_OFFLINE": None, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": hub.url}
    try:
        result = run_cli("process", "--config", make_config(model="someone/huge-llava"), photo, env=env)
    finally:
        hub.close()
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "model 'someone/huge-llava' needs about " in errors[0] and "on the CPU's memory" in errors[0]
    assert "GiB are free" in errors[0] and "(model.id)" in errors[0], errors[0]
    fetched = [r for r in hub.requests if r.startswith("GET") and "/resolve/" in r]
    assert all(r.endswith(("/config.json", "/model.safetensors.index.json")) for r in fetched), hub.requests
    assert "downloading" in result.stderr  # it was a download that stopped, not a cached model


def test_fewer_anyres_tiles_is_an_explicit_option(tiny_model: Path, corpus: Path) -> None:
    picture = open_picture(corpus / "jpg/gps/DSCN0010.jpg", max_pixels=10**9)
    prompt = (Prompt("Describe.", 4),)
    full = load_engine(ModelConfig(id=str(tiny_model))).describe([Job(picture.image, prompt)])[0][0]
    fewer = load_engine(ModelConfig(id=str(tiny_model), image_grid_pinpoints=((32, 64), (64, 32))))
    answer = fewer.describe([Job(picture.image, prompt)])[0][0]
    assert answer.prompt_tokens < full.prompt_tokens and answer.new_tokens > 0


# --- persistent decode state, compiled steps, batch sizes from memory (issue 10) ----------------------------


def answers_of(engine: Any, pictures: list[Any], prompt_sets: list[tuple[Prompt, ...]]) -> list[list[str]]:
    jobs = [Job(p.image, prompts) for p, prompts in zip(pictures, prompt_sets, strict=True)]
    return [[answer.text for answer in per_image] for per_image in engine.describe(jobs)]


def test_padded_buckets_give_the_answers_of_plain_generate(tiny_model: Path, corpus: Path) -> None:
    """The GPU's shapes on the CPU: images padded up to a bucket (padding rows ended from the start), slots
    rounded up to SLOT_BUCKET, one persistent state per bucket reused by the next batch; different rules per
    image and answers of different lengths."""
    from autocaption.engine.tree import IMAGE_BUCKETS, SLOT_BUCKET

    engine: Any = load_engine(ModelConfig(id=str(tiny_model), batch_size=11))
    engine.tree.bucketed = True  # what compile or CUDA graphs switch on
    pictures = [open_picture(corpus / name, max_pixels=10**9, draft_side=64) for name in IMAGES]
    prompt_sets = [PROMPTS + EXTRA[: i % 4] for i in range(len(pictures))]  # 2 to 5 rules
    answers = answers_of(engine, pictures, prompt_sets)
    for picture, prompts, texts in zip(pictures, prompt_sets, answers, strict=True):
        assert texts == [reference_generate(tiny_model, picture.image, prompt) for prompt in prompts]
    rows = {rows for rows, _ in engine.tree.states}
    assert rows <= set(IMAGE_BUCKETS) and all(state.slots % SLOT_BUCKET == 0 for state in engine.tree.states.values())
    kept = {key: id(state) for key, state in engine.tree.states.items()}
    assert answers_of(engine, pictures, prompt_sets) == answers
    assert {key: id(state) for key, state in engine.tree.states.items()} == kept  # reused, not made again


def test_a_compiled_step_never_recompiles_after_its_first_batch(
    tiny_model: Path, corpus: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """model.compile on the CPU: the decode step through inductor, whole graph (fullgraph), fixed shapes.
    Several batches of one bucket compile once."""
    import torch._dynamo

    torch._dynamo.reset()
    engine: Any = load_engine(ModelConfig(id=str(tiny_model), batch_size=6, compile=True))
    pictures = [open_picture(corpus / name, max_pixels=10**9, draft_side=64) for name in IMAGES[:4]]
    prompts = (PROMPTS[0], EXTRA[0])
    with caplog.at_level(logging.WARNING):
        first = answers_of(engine, pictures[:2], [prompts, prompts])  # one batch: 2 images x 2 rules, bucket 2
    if not engine.compile:  # this torch/transformers pair cannot trace the step (torch 2.6, transformers 5.5)
        assert "decoding uncompiled" in caplog.text
        assert first == [[reference_generate(tiny_model, p.image, prompt) for prompt in prompts] for p in pictures[:2]]
        pytest.skip(f"torch {torch.__version__} cannot compile this transformers' forward: decoded uncompiled")
    compiled = dict(torch._dynamo.utils.counters["stats"])
    assert compiled.get("unique_graphs", 0) >= 1
    second = answers_of(engine, pictures[2:], [prompts, prompts])  # the same bucket, other photos
    third = answers_of(engine, pictures[:2], [prompts, prompts])
    assert dict(torch._dynamo.utils.counters["stats"]).get("unique_graphs") == compiled.get("unique_graphs")
    assert third == first
    for picture, texts in zip(pictures[:2] + pictures[2:], first + second, strict=True):
        assert texts == [reference_generate(tiny_model, picture.image, prompt) for prompt in prompts]


def test_a_refused_compile_decodes_uncompiled_and_says_so_once(
    tiny_model: Path, corpus: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever torch cannot trace is decoded as it is: one warning, the same answers, no second try for the
    next bucket."""
    import torch._dynamo.exc

    tries: list[int] = []

    def refusing(step: Any, **options: Any) -> Any:
        def traced() -> None:
            tries.append(1)
            raise torch._dynamo.exc.Unsupported("call_method co_varnames __contains__")

        return traced

    monkeypatch.setattr(torch, "compile", refusing)
    engine: Any = load_engine(ModelConfig(id=str(tiny_model), batch_size=6, compile=True))
    pictures = [open_picture(corpus / name, max_pixels=10**9, draft_side=64) for name in IMAGES[:3]]
    prompts = (PROMPTS[0], EXTRA[0])
    with caplog.at_level(logging.WARNING):
        answers = answers_of(engine, pictures[:2], [prompts, prompts]) + answers_of(engine, pictures[2:], [prompts])
    assert answers == [[reference_generate(tiny_model, p.image, prompt) for prompt in prompts] for p in pictures]
    assert tries == [1] and not engine.compile and not engine.tree.bucketed  # the CPU pads no more
    refusals = [r.getMessage() for r in caplog.records if "decoding uncompiled" in r.getMessage()]
    assert len(refusals) == 1 and "co_varnames" in refusals[0] and torch.__version__ in refusals[0]


def test_a_refused_graph_capture_decodes_step_by_step_and_says_so_once(
    tiny_model: Path, corpus: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build that refuses CUDA/HIP graph capture decodes as it is: one warning, the same answers, no second
    try for the next bucket. The CUDA calls are stand-ins (no GPU here), the capture refuses on entry, as a
    capture that fails records nothing and runs nothing."""
    import contextlib

    captures: list[int] = []

    class Stream:
        def wait_stream(self, other: object) -> None:
            pass

    class Refusing:
        def capture_begin(self, pool: object, capture_error_mode: str) -> None:
            captures.append(1)
            raise RuntimeError("operation not permitted when stream is capturing")

    for name, stand_in in {
        "Stream": lambda device: Stream(), "current_stream": lambda device: Stream(),
        "stream": lambda stream: contextlib.nullcontext(), "CUDAGraph": Refusing, "synchronize": lambda device: None,
        "graph_pool_handle": lambda: (0, 1), "empty_cache": lambda: None,
    }.items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, stand_in)
    engine: Any = load_engine(ModelConfig(id=str(tiny_model), batch_size=6))
    engine.graphs = engine.tree.bucketed = True  # what a GPU switches on
    pictures = [open_picture(corpus / name, max_pixels=10**9, draft_side=64) for name in IMAGES[:3]]
    prompts = (PROMPTS[0], EXTRA[0])
    with caplog.at_level(logging.WARNING):
        answers = answers_of(engine, pictures[:2], [prompts, prompts]) + answers_of(engine, pictures[2:], [prompts])
    assert answers == [[reference_generate(tiny_model, p.image, prompt) for prompt in prompts] for p in pictures]
    assert captures == [1] and not engine.graphs and not engine.tree.bucketed
    assert list(engine.tree.states) == [(1, 2)]  # the padded state of the refused bucket (2, 2) was freed
    refusals = [r.getMessage() for r in caplog.records if "without CUDA/HIP graphs" in r.getMessage()]
    assert len(refusals) == 1 and "stream is capturing" in refusals[0]


def test_cancel_stops_a_batch_at_the_next_step(tmp_path: Path, corpus: Path) -> None:
    import json
    import threading

    from autocaption.engine import Cancelled
    from tests.tinymodel import build_tiny

    endless = build_tiny(tmp_path / "endless")
    settings = json.loads((endless / "generation_config.json").read_text(encoding="utf-8"))
    settings["eos_token_id"] = None  # every branch decodes to its limit
    (endless / "generation_config.json").write_text(json.dumps(settings), encoding="utf-8")
    engine: Any = load_engine(ModelConfig(id=str(endless), batch_size=4))
    picture = open_picture(corpus / IMAGES[0], max_pixels=10**9, draft_side=64)
    cancel = threading.Event()
    steps = []
    forward = engine._forward

    def counting(*args: Any) -> Any:
        steps.append(1)
        if len(steps) == 5:
            cancel.set()  # as SIGTERM does
        return forward(*args)

    engine._forward = counting
    with pytest.raises(Cancelled):
        engine.describe([Job(picture.image, (Prompt("Describe.", 400), Prompt("Colours?", 400)))], cancel)
    assert len(steps) == 5  # the host looks before every step (it was every 16th): not one more step, not 400


def test_batch_size_auto_from_stated_free_memory(tiny_model: Path, caplog: pytest.LogCaptureFixture) -> None:
    from autocaption.engine.memory import CPU_PROMPTS, GiB, plan_batches

    kv = 131072  # bytes per token: llava-v1.6-mistral-7b in bf16 (32 layers x 8 KV heads x 128 x 2 x 2)
    big = plan_batches(free=125 * GiB, total=140 * GiB, kv_per_token=kv)  # an H200 with 15 GB of weights loaded
    assert big.images == 32 and big.prompts == 256 and big.kv_budget == 125 * GiB - 14 * GiB
    mid = plan_batches(free=8 * GiB, total=24 * GiB, kv_per_token=kv)  # a 24 GB card
    # each photo's decode slots (3,600) and its prefill's own copy (3,000), rounded down to a bucket: 6.9 -> 6
    assert (8 * GiB - int(2.4 * GiB)) // (kv * 6600) == 6 and mid.images == 6
    assert mid.line().startswith(f"batches of up to {mid.images} images / {mid.prompts} prompts, ")
    assert plan_batches(free=GiB, total=8 * GiB, kv_per_token=kv).images == 1  # never less than one
    with caplog.at_level("INFO"):
        engine: Any = load_engine(ModelConfig(id=str(tiny_model)))  # batch_size: auto (the default) on the CPU
    assert engine.batch_size == CPU_PROMPTS and engine.info.batch_images == CPU_PROMPTS
    # issue 17.16: it promised "32 images / 12 prompts": a batch of 12 prompts holds 12 images at most
    assert f"batches of up to {CPU_PROMPTS} images / {CPU_PROMPTS} prompts" in caplog.text


def test_the_attention_self_check_falls_back_to_the_math_kernel(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:

    from autocaption.engine import loading
    from autocaption.engine.devices import Placement
    from autocaption.engine.tree import TREE_ATTENTION, TREE_ATTENTION_MATH, grouped_sdpa, grouped_sdpa_math

    class Text:
        num_attention_heads, head_dim = 32, 128

    gpu = Placement("cuda:0", "bfloat16", "cuda:0 (a card whose fused kernel is wrong)")
    monkeypatch.setattr(loading, "masked_sdpa_problem", lambda *a, **k: "largest difference 3.1 (tolerance 0.02)")
    with caplog.at_level("WARNING"):
        assert loading._attention(ModelConfig(), gpu, Text()) == TREE_ATTENTION_MATH
    assert "disagrees with the math kernel" in caplog.text
    monkeypatch.setattr(loading, "masked_sdpa_problem", lambda *a, **k: None)
    assert loading._attention(ModelConfig(), gpu, Text()) == TREE_ATTENTION
    assert loading._attention(ModelConfig(attn_implementation="eager"), gpu, Text()) == "eager"

    class Module(torch.nn.Module):
        num_key_value_groups = 2

    query, key, value = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    mask = torch.zeros(2, 1, 3, 10).masked_fill_(torch.rand(2, 1, 3, 10) > 0.6, float("-inf"))
    mask[..., 0] = 0
    fast, _ = grouped_sdpa(Module(), query, key, value, mask)
    exact, _ = grouped_sdpa_math(Module(), query, key, value, mask)
    assert torch.allclose(fast, exact, atol=1e-5)
