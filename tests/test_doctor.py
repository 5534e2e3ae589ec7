"""`autocaption doctor`: every verdict from stated facts (a healthy ROCm host, then one thing wrong at a
time), the facts read from a fake kfd topology, and the real command on this machine."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from autocaption.doctor import Check, Facts, GiB, ModelFacts, UnitFacts, _amd_gfx, checks
from autocaption.engine.devices import Accelerator, Gpu
from tests.conftest import RunCli

RADEON = Gpu("AMD Radeon RX 7900 XTX", 24 * GiB, 23 * GiB, "gfx1100")
ROCM_TORCH = Accelerator(1, "6.2.41133", None, True, (RADEON.name,), (RADEON,), "2.5.1+rocm6.2")
CPU_TORCH = Accelerator(0, None, None, False, torch_version="2.13.0+cpu")


def healthy(**changes: object) -> Facts:
    facts = Facts(
        accelerator=ROCM_TORCH, torch_problem=None, amd_gfx=("gfx1100",), nvidia=False,
        devices={"/dev/kfd": True, "/dev/dri/renderD128": True}, user="photos", groups=frozenset({"render", "video"}),
        hsa_override=None, sdpa_device="cuda:0", sdpa_problem=None,
        model=ModelFacts("llava-hf/llava-v1.6-mistral-7b-hf", Path("/cache/snapshots/abc"), int(15.1 * GiB)),
        memory_available=60 * GiB, state_dir=Path("/var/lib/autocaption"), state_problem=None, daemon_pid=4242,
        watched_folders=1200, inotify_limit=524288,
        unit=UnitFacts(Path("/etc/systemd/system/autocaption.service"), False, "enabled", "active", 4242),
    )  # fmt: skip
    return dataclasses.replace(facts, **changes)  # type: ignore[arg-type]


def failing(found: list[Check]) -> list[Check]:
    return [check for check in found if not check.ok]


def test_a_healthy_rocm_host_passes_every_check() -> None:
    found = checks(healthy())
    assert failing(found) == [], found
    lines = [check.line() for check in found]
    assert lines[:2] == [
        "✓ every dependency is within the range autocaption is tested with",
        "✓ torch 2.5.1+rocm6.2: ROCm 6.2.41133 build",
    ]
    assert "✓ cuda:0: AMD Radeon RX 7900 XTX, 24.0 GiB, 23.0 GiB free, gfx1100" in lines
    assert "✓ /dev/dri/renderD128, /dev/kfd usable by photos (groups: render, video)" in lines
    assert any("held by the service's daemon (pid 4242)" in line for line in lines)
    assert all(line.startswith("✓ ") for line in lines)


@pytest.mark.parametrize(
    ("changes", "said", "fix"),
    [
        ({"accelerator": CPU_TORCH},
         "is a CPU-only build, but this machine has an AMD GPU (gfx1100)", "--index-url https://download.pytorch.org/whl/rocm"),
        ({"accelerator": dataclasses.replace(ROCM_TORCH, gpu_count=0, gpus=())},
         "torch (ROCm 6.2.41133) sees no GPU", "sudo usermod -aG render,video photos"),
        ({"devices": {"/dev/kfd": False, "/dev/dri/renderD128": True}, "groups": frozenset({"photos"})},
         "/dev/kfd not readable and writable by photos (groups: neither render nor video)", "usermod -aG render,video"),
        ({"devices": {}}, "/dev/kfd does not exist", "amdgpu-install"),
        ({"amd_gfx": ("gfx1031",)}, "gfx1031 is not among the architectures", "HSA_OVERRIDE_GFX_VERSION=10.3.0"),
        ({"amd_gfx": ("gfx1103",)}, "gfx1103 is not among the architectures", "HSA_OVERRIDE_GFX_VERSION=11.0.0"),
        ({"amd_gfx": ("gfx1010",)}, "no known stand-in", "model.engine: openai"),
        ({"sdpa_problem": "largest difference 3.2 (tolerance 0.02)"}, "masked attention disagrees", "math kernel"),
        ({"model": ModelFacts("Qwen/Qwen2.5-VL-7B-Instruct", None, 0)}, "is not on this machine", "hf download"),
        ({"model": ModelFacts("big", Path("/m"), 30 * GiB)}, "needs about 32.0 GiB on the GPU; 23.0 GiB are free",
         "smaller model"),
        ({"state_problem": "not writable by this user"}, "state.dir /var/lib/autocaption: not writable", "permissions"),
        ({"daemon_pid": 999}, "held by another autocaption daemon (pid 999)", "stop that daemon"),
        ({"watched_folders": 9000, "inotify_limit": 8192}, "9,000 folders to watch with inotify; the limit is 8,192",
         "max_user_watches=1048576"),
        ({"unit": UnitFacts(None, False, None, None, None), "daemon_pid": None}, "not installed", "service install"),
        ({"unit": UnitFacts(Path("/u"), False, "disabled", "inactive", None), "daemon_pid": None},
         "is disabled, so it does not start at boot", "enable --now"),
        ({"unit": UnitFacts(Path("/u"), True, "enabled", "failed", None), "daemon_pid": None}, "is enabled but failed",
         "journalctl --user -u autocaption"),
        ({"dependencies": ("transformers 5.3.0 is installed; autocaption needs transformers>=5.5,<5.25: pip install "
                           "'transformers>=5.5,<5.25'",), "newer_only": False}, "transformers 5.3.0 is installed",
         None),
    ],
)  # fmt: skip
def test_each_problem_is_one_failing_line_with_its_fix(changes: dict[str, object], said: str, fix: str | None) -> None:
    bad = failing(checks(healthy(**changes)))
    assert len(bad) == 1, bad
    assert said in bad[0].what and (fix is None or fix in (bad[0].fix or "")), bad[0]
    assert bad[0].line().startswith("✗ ") and (fix is None or " — fix: " in bad[0].line())


def test_a_gpu_build_without_a_gpu_passes_when_the_config_asks_for_the_cpu() -> None:
    """Issue 17.16: doctor failed on a host without a GPU although the config said `device: cpu`."""
    no_gpu = dataclasses.replace(ROCM_TORCH, gpus=())
    assert failing(checks(healthy(accelerator=no_gpu, amd_gfx=(), devices={})))[0].what.endswith("sees no GPU")
    found = checks(healthy(accelerator=no_gpu, amd_gfx=(), devices={}, device="cpu", memory_available=64 * GiB))
    said = next(check for check in found if "sees no GPU" in check.what)
    assert said.ok and "model.device is cpu" in said.what and "slowly" in said.what


def test_override_set_and_cpu_only_hosts() -> None:
    assert failing(checks(healthy(amd_gfx=("gfx1031",), hsa_override="10.3.0"))) == []
    found = checks(healthy(accelerator=CPU_TORCH, amd_gfx=(), devices={}, sdpa_device="cpu", memory_available=8 * GiB))
    assert found[1].ok and found[1].what.startswith("torch 2.13.0+cpu: CPU-only build; no GPU on this machine")
    memory = [check for check in found if "on the CPU it needs" in check.what]
    assert memory and not memory[0].ok  # 2 x 15.1 GiB of float32 weights do not fit in 8 GiB
    assert (
        checks(healthy(accelerator=None, torch_problem="No module named 'torch'"))[0]
        .line()
        .startswith("✗ torch cannot be imported (No module named 'torch')")
    )


def test_gfx_names_come_from_the_kfd_topology(tmp_path: Path) -> None:
    for node, version in (("0", "0"), ("1", "110000"), ("2", "90010"), ("3", "100301")):
        (tmp_path / node).mkdir()
        (tmp_path / node / "properties").write_text(f"cpu_cores_count 0\ngfx_target_version {version}\n")
    assert _amd_gfx(tmp_path) == ("gfx1100", "gfx90a", "gfx1031")


def test_doctor_runs_on_this_machine(run_cli: RunCli, make_config: Callable[..., Path], tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "2024").mkdir(parents=True)
    result = run_cli("doctor", "--config", make_config(extra=f"watch: [{{path: {str(inbox)!r}}}]"))
    lines = result.stdout.splitlines()
    assert lines and all(line[:2] in ("✓ ", "✗ ") for line in lines), result.stdout
    assert result.returncode == (1 if any(line.startswith("✗") for line in lines) else 0), result.stdout
    assert any("masked attention agrees with the math kernel on cpu" in line for line in lines)
    assert any("tiny-llava" in line and "GiB of weights" in line for line in lines)  # a local model folder
    assert any("2 folders to watch with inotify" in line for line in lines), lines
    assert "Traceback" not in result.stderr


def test_a_model_not_downloaded_yet_is_measured_by_what_the_hub_lists() -> None:
    """Issue 22: on a 24 GB machine without a GPU the default model was found too big only after its 15 GB
    download. doctor now says so from the hub's listing, before the first run downloads it."""
    listed = ModelFacts("llava-hf/llava-v1.6-mistral-7b-hf", None, int(15.1 * GiB))
    cpu_host = {"accelerator": CPU_TORCH, "amd_gfx": (), "devices": {}, "device": "cpu", "memory_available": 22 * GiB}
    found = checks(healthy(model=listed, **cpu_host))
    lines = [check.line() for check in found]
    assert "✓ model llava-hf/llava-v1.6-mistral-7b-hf: not downloaded yet; the hub lists 15.1 GiB of weights" in lines
    bad = failing(found)
    assert len(bad) == 1 and "on the CPU it needs about 32.2 GiB of memory; 22.0 GiB are available" in bad[0].what
    assert failing(checks(healthy(model=listed))) == []  # a 24 GB card: fits
    unknown = ModelFacts("llava-hf/llava-v1.6-mistral-7b-hf", None, 0)  # no listing (offline, or no network)
    assert "is not on this machine" in failing(checks(healthy(model=unknown)))[0].what
