"""`autocaption doctor`: is this machine ready to caption photos, on its GPU? One line per check, ✓ or ✗
with the fix. Written for ROCm hosts first, where most set-up problems live (a CPU build of torch, a user
outside the render group, a consumer card ROCm does not list, a kernel that computes masked attention
wrongly), and useful on NVIDIA and CPU-only hosts too.

Facts are gathered once (`gather`, the only part that touches the machine) and the checks are pure
functions of them (`checks`), so every verdict can be tested with stated facts.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from autocaption.config import Config, defaults
from autocaption.dependencies import findings
from autocaption.engine import hub
from autocaption.engine.devices import Accelerator, ram_available
from autocaption.errors import AutocaptionError
from autocaption.locks import POLLED_FILE, DaemonLock, daemon_note
from autocaption.paths import display
from autocaption.unit import SYSTEM_UNIT_DIR, UNIT_NAME

GiB = 2**30
# The architectures PyTorch's ROCm wheels are built for. Others need HSA_OVERRIDE_GFX_VERSION to pose as
# the nearest one (or do not work at all).
ROCM_BUILT_FOR = frozenset({
    "gfx900", "gfx906", "gfx908", "gfx90a", "gfx940", "gfx941", "gfx942", "gfx950",
    "gfx1030", "gfx1100", "gfx1101", "gfx1102", "gfx1200", "gfx1201",
})  # fmt: skip
# What those consumer and APU chips can pose as (the values the ROCm community uses).
GFX_OVERRIDES = {
    **{f"gfx103{n}": "10.3.0" for n in range(1, 7)},  # RDNA2: RX 6700/6600/6500, Steam Deck, 6000-series APUs
    "gfx1103": "11.0.0", "gfx1150": "11.0.0", "gfx1151": "11.0.0", "gfx1152": "11.0.0",  # RDNA3/3.5 APUs
    "gfx90c": "9.0.0",  # Vega APUs (Renoir, Cezanne)
}  # fmt: skip
WORKING_MEMORY = 2 * GiB  # activations and the KV cache of a few images, beyond the weights
ROCM_INDEX = "https://download.pytorch.org/whl/rocm6.2"
CUDA_INDEX = "https://download.pytorch.org/whl/cu128"


@dataclass(frozen=True)
class Check:
    ok: bool
    what: str
    fix: str | None = None

    def line(self) -> str:
        return f"{'✓' if self.ok else '✗'} {self.what}" + (f" — fix: {self.fix}" if self.fix else "")


@dataclass(frozen=True)
class ModelFacts:
    id: str
    folder: Path | None  # where its files are on this machine (a local folder, or its cache snapshot)
    size_bytes: int  # weights on disk; for a model not downloaded yet, what the hub lists (0: unknown)


@dataclass(frozen=True)
class UnitFacts:
    path: Path | None  # the installed unit file
    user: bool  # a user unit (systemctl --user)
    enabled: str | None  # what `systemctl is-enabled` says; None when systemd cannot be asked
    active: str | None
    main_pid: int | None


@dataclass(frozen=True)
class Facts:
    accelerator: Accelerator | None  # None when torch cannot be imported
    torch_problem: str | None
    amd_gfx: tuple[str, ...]  # AMD GPUs the kernel driver lists (/sys/class/kfd), seen even when torch sees none
    nvidia: bool  # an NVIDIA device node exists
    devices: dict[str, bool]  # GPU device node -> readable and writable by this user
    user: str
    groups: frozenset[str]
    hsa_override: str | None
    sdpa_device: str
    sdpa_problem: str | None  # None: masked attention agrees with the math kernel
    model: ModelFacts
    memory_available: int | None  # RAM, for a CPU-only host
    state_dir: Path
    state_problem: str | None  # None: writable
    daemon_pid: int | None
    watched_folders: int  # folders under inotify watches (one watch each)
    inotify_limit: int | None
    unit: UnitFacts
    dependencies: tuple[str, ...] = ()  # one line per dependency outside its tested range (dependencies.py)
    journal_problem: str | None = None  # what SQLite's integrity check says of the journal; None: sound or none yet
    device: str = "auto"  # model.device: `cpu` asks for no GPU
    newer_only: bool = True  # every one of them is newer than tested (a warning), none older or missing
    polled: str | None = None  # what a running daemon says of the folders it polls because inotify cannot watch them


# --- the checks -------------------------------------------------------------------------------------------


def checks(facts: Facts) -> list[Check]:
    if facts.accelerator is None:
        return [Check(False, f"torch cannot be imported ({facts.torch_problem})",
                      "install torch's ROCm or CUDA build, then `pip install -e .` (docs/models.md)")]  # fmt: skip
    acc = facts.accelerator
    found: list[Check] = [_dependencies(facts), _torch_build(facts, acc), *_gpus(facts, acc)]
    if facts.amd_gfx or facts.accelerator.hip_version:
        found.append(_device_access(facts))
        found.extend(_gfx_override(facts, arch) for arch in facts.amd_gfx)
    found.append(_attention(facts))
    found.extend(_model(facts, facts.accelerator))
    found.append(_state(facts))
    if facts.journal_problem:
        found.append(Check(False, facts.journal_problem, "autocaption rebuild --config <rules file> (the daemon "
                           "also rebuilds it by itself when it starts; the damaged file is kept)"))  # fmt: skip
    if facts.watched_folders:
        found.append(_inotify(facts))
    if facts.polled and facts.daemon_pid:
        found.append(Check(False, f"the running daemon: {facts.polled}"))
    found.append(_unit(facts))
    return found


def _dependencies(facts: Facts) -> Check:
    if not facts.dependencies:
        return Check(True, "every dependency is within the range autocaption is tested with")
    return Check(facts.newer_only, "; ".join(facts.dependencies))


def _torch_build(facts: Facts, acc: Accelerator) -> Check:
    version = f"torch {acc.torch_version}"
    if acc.hip_version:
        if not facts.amd_gfx and facts.nvidia:
            return Check(False, f"{version} is a ROCm build, but this machine has an NVIDIA GPU",
                         f"pip install torch --index-url {CUDA_INDEX}")  # fmt: skip
        return Check(True, f"{version}: ROCm {acc.hip_version} build")
    if acc.cuda_version:
        if facts.amd_gfx and not facts.nvidia:
            return Check(False, f"{version} is a CUDA build, but this machine's GPU is AMD",
                         f"pip install torch --index-url {ROCM_INDEX} (the index of your ROCm version)")  # fmt: skip
        return Check(True, f"{version}: CUDA {acc.cuda_version} build")
    if facts.amd_gfx:
        gfx = ", ".join(facts.amd_gfx)
        return Check(False, f"{version} is a CPU-only build, but this machine has an AMD GPU ({gfx})",
                     f"pip install torch --index-url {ROCM_INDEX} (the index of your ROCm version), then "
                     "pip install -e .")  # fmt: skip
    if facts.nvidia:
        return Check(False, f"{version} is a CPU-only build, but this machine has an NVIDIA GPU",
                     f"pip install torch --index-url {CUDA_INDEX}, then pip install -e .")  # fmt: skip
    return Check(True, f"{version}: CPU-only build; no GPU on this machine, so captions run on the CPU (slowly)")


def _gpus(facts: Facts, acc: Accelerator) -> list[Check]:
    if not (acc.hip_version or acc.cuda_version):
        return []
    if not acc.gpus and facts.device == "cpu":
        return [Check(True, f"torch ({acc.runtime}) sees no GPU; model.device is cpu, so captions run on the CPU "
                            "(slowly: a 7B model takes minutes per photo)")]  # fmt: skip
    if not acc.gpus:
        fix = (
            "add yourself to the render and video groups (sudo usermod -aG render,video "
            f"{facts.user}, then log in again); check HIP_VISIBLE_DEVICES"
            if acc.hip_version
            else "check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"
        )
        return [Check(False, f"torch ({acc.runtime}) sees no GPU", fix)]
    lines = []
    for index, gpu in enumerate(acc.gpus):
        free = f", {gpu.free_bytes / GiB:.1f} GiB free" if gpu.free_bytes is not None else ""
        lines.append(Check(True, f"cuda:{index}: {gpu.name}, {gpu.total_bytes / GiB:.1f} GiB{free}, {gpu.arch}"))
    return lines


def _device_access(facts: Facts) -> Check:
    missing = sorted(path for path, usable in facts.devices.items() if not usable)
    groups = [group for group in ("render", "video") if group in facts.groups]
    in_groups = f"groups: {', '.join(groups) or 'neither render nor video'}"
    if "/dev/kfd" not in facts.devices:
        return Check(False, "/dev/kfd does not exist: the amdgpu kernel driver (ROCm) is not loaded",
                     "install ROCm's kernel driver (amdgpu-install --usecase=rocm) and reboot")  # fmt: skip
    if missing:
        return Check(False, f"{', '.join(missing)} not readable and writable by {facts.user} ({in_groups})",
                     f"sudo usermod -aG render,video {facts.user}, then log in again")  # fmt: skip
    return Check(True, f"{', '.join(sorted(facts.devices))} usable by {facts.user} ({in_groups})")


def _gfx_override(facts: Facts, arch: str) -> Check:
    if arch in ROCM_BUILT_FOR:
        return Check(True, f"{arch} is supported by PyTorch's ROCm builds")
    if facts.hsa_override:
        return Check(True, f"{arch} runs as HSA_OVERRIDE_GFX_VERSION={facts.hsa_override}")
    value = GFX_OVERRIDES.get(arch)
    if value is None:
        return Check(False, f"{arch} is not supported by PyTorch's ROCm builds and has no known stand-in",
                     "use a supported card, the CPU (model.device: cpu), or a remote server "
                     "(model.engine: openai)")  # fmt: skip
    return Check(False, f"{arch} is not among the architectures PyTorch's ROCm builds support",
                 f"export HSA_OVERRIDE_GFX_VERSION={value} (for the service: Environment=HSA_OVERRIDE_GFX_VERSION="
                 f"{value} in its unit)")  # fmt: skip


def _attention(facts: Facts) -> Check:
    if facts.sdpa_problem is None:
        return Check(True, f"masked attention agrees with the math kernel on {facts.sdpa_device}")
    return Check(False, f"masked attention disagrees with the math kernel on {facts.sdpa_device}: "
                 f"{facts.sdpa_problem}", "update torch; until then the engine uses the math kernel for "
                 "tree decoding (slower, correct)")  # fmt: skip


def _model(facts: Facts, acc: Accelerator) -> list[Check]:
    model = facts.model
    size = model.size_bytes / GiB
    if model.folder is None and not model.size_bytes:
        return [Check(False, f"model {model.id} is not on this machine (not in the Hugging Face cache)",
                      f"run autocaption once with network access, or: hf download {model.id}")]  # fmt: skip
    if model.folder is None:  # the first run downloads it: whether it will fit is told now, before that
        found = [Check(True, f"model {model.id}: not downloaded yet; the hub lists {size:.1f} GiB of weights")]
    else:
        found = [Check(True, f"model {model.id}: {size:.1f} GiB of weights in {display(model.folder)}")]
    need = model.size_bytes + WORKING_MEMORY
    gpu = acc.gpus[0] if acc.gpus else None
    if gpu is not None and gpu.free_bytes is not None:
        fits = need <= gpu.free_bytes
        found.append(Check(fits, f"it needs about {need / GiB:.1f} GiB on the GPU; {gpu.free_bytes / GiB:.1f} GiB "
                           "are free on cuda:0", None if fits else "free GPU memory (other processes), or "
                           "choose a smaller model in model.id"))  # fmt: skip
    elif gpu is None and facts.memory_available is not None:
        need = 2 * model.size_bytes + WORKING_MEMORY  # float32 on the CPU: twice the bf16 weights
        fits = need <= facts.memory_available
        found.append(Check(fits, f"on the CPU it needs about {need / GiB:.1f} GiB of memory; "
                           f"{facts.memory_available / GiB:.1f} GiB are available", None if fits else
                           "a smaller model in model.id, or a GPU"))  # fmt: skip
    return found


def _state(facts: Facts) -> Check:
    where = display(facts.state_dir)
    if facts.state_problem:
        return Check(False, f"state.dir {where}: {facts.state_problem}",
                     "set state.dir to a folder this user can write, or fix its permissions")  # fmt: skip
    if facts.daemon_pid is None:
        return Check(True, f"state.dir {where} is writable; no daemon holds it")
    if facts.unit.main_pid == facts.daemon_pid:
        return Check(True, f"state.dir {where} is writable; held by the service's daemon (pid {facts.daemon_pid})")
    return Check(False, f"state.dir {where} is held by another autocaption daemon (pid {facts.daemon_pid or '?'})",
                 "stop that daemon, or give this configuration its own state.dir")  # fmt: skip


def _inotify(facts: Facts) -> Check:
    if facts.inotify_limit is None:
        return Check(True, f"{facts.watched_folders} folders to watch (inotify limit unknown)")
    fits = facts.watched_folders < facts.inotify_limit * 0.9  # other programs use watches too
    return Check(fits, f"{facts.watched_folders:,} folders to watch with inotify; the limit is "
                 f"{facts.inotify_limit:,} watches", None if fits else
                 "sudo sysctl fs.inotify.max_user_watches=1048576, and the same line in "
                 "/etc/sysctl.d/90-autocaption.conf")  # fmt: skip


def _unit(facts: Facts) -> Check:
    unit = facts.unit
    control = "systemctl --user" if unit.user else "sudo systemctl"
    if unit.path is None:
        return Check(False, "the systemd unit is not installed",
                     "sudo autocaption service install --config F (or --user), then run what it prints")  # fmt: skip
    if unit.enabled is None:
        return Check(True, f"unit {display(unit.path)} installed (systemd cannot be asked here)")
    if unit.enabled != "enabled":
        return Check(False, f"unit {display(unit.path)} is {unit.enabled}, so it does not start at boot",
                     f"{control} enable --now autocaption")  # fmt: skip
    if unit.active != "active":
        journal = "journalctl --user" if unit.user else "journalctl"
        return Check(False, f"unit {display(unit.path)} is enabled but {unit.active}",
                     f"{control} start autocaption; {journal} -u autocaption")  # fmt: skip
    return Check(True, f"unit {display(unit.path)} is enabled and active (pid {unit.main_pid})")


# --- gathering the facts ----------------------------------------------------------------------------------


def gather(config: Config) -> Facts:
    outside = findings()
    accelerator, problem, sdpa_device, sdpa_problem = _torch_facts()
    devices = {path: os.access(path, os.R_OK | os.W_OK) for path in _gpu_nodes()}
    user = pwd.getpwuid(os.getuid()).pw_name
    state = config.state.dir
    return Facts(
        accelerator=accelerator,
        torch_problem=problem,
        amd_gfx=_amd_gfx(),
        nvidia=Path("/dev/nvidiactl").exists(),
        devices=devices,
        user=user,
        groups=frozenset(grp.getgrgid(gid).gr_name for gid in os.getgroups()),
        hsa_override=os.environ.get("HSA_OVERRIDE_GFX_VERSION"),
        sdpa_device=sdpa_device,
        sdpa_problem=sdpa_problem,
        model=_model_facts(config.model.id, config.model.revision or "main", offline=config.model.local_files_only),
        memory_available=ram_available(),
        state_dir=state,
        state_problem=_writable(state),
        daemon_pid=DaemonLock(state).holder(),
        watched_folders=_folders_under(config),
        inotify_limit=_inotify_limit(),
        polled=daemon_note(state, POLLED_FILE),
        unit=_unit_facts(),
        dependencies=tuple(finding.line() for finding in outside),
        newer_only=all(finding.newer for finding in outside),
        journal_problem=_journal_problem(state),
        device=config.model.device,
    )


def _journal_problem(state: Path) -> str | None:
    """SQLite's own integrity check of the journal, read-only (a daemon may be writing it)."""
    from autocaption.journal import Journal

    if not Journal.exists(state):
        return None
    try:
        journal = Journal(state, read_only=True)
    except AutocaptionError as exc:
        return str(exc)
    try:
        verdict = journal.integrity()
    except AutocaptionError as exc:
        return str(exc)
    finally:
        journal.close()
    return None if verdict == "ok" else f"state.dir: the journal fails SQLite's integrity check: {verdict}"


def _torch_facts() -> tuple[Accelerator | None, str | None, str, str | None]:
    try:
        import torch

        from autocaption.engine.hardware import accelerator, masked_sdpa_problem
    except ImportError as exc:
        return None, str(exc), "cpu", None
    acc = accelerator()
    device, dtype = ("cuda:0", torch.float16) if acc.gpu_count else ("cpu", torch.float32)
    return acc, None, device, masked_sdpa_problem(device, dtype)


def _gpu_nodes() -> list[str]:
    nodes = [path for path in ("/dev/kfd",) if os.path.exists(path)]
    dri = Path("/dev/dri")
    if dri.is_dir():
        nodes += sorted(str(node) for node in dri.glob("renderD*"))
    return nodes


def _amd_gfx(topology: Path = Path("/sys/class/kfd/kfd/topology/nodes")) -> tuple[str, ...]:
    """gfx names of the GPU nodes the amdgpu driver reports (gfx_target_version 110000 -> gfx1100)."""
    found = []
    for properties in sorted(topology.glob("*/properties")):
        try:
            text = properties.read_text(encoding="ascii")
        except OSError:
            continue
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == "gfx_target_version" and value.strip().isdigit() and int(value) > 0:
                version = int(value)
                found.append(f"gfx{version // 10000}{version // 100 % 100}{version % 100:x}")
    return tuple(found)


def _model_facts(model_id: str, revision: str, *, offline: bool) -> ModelFacts:
    """Where the model is and its weights' size; a hub id not downloaded yet is measured by what the hub
    lists (unless downloads are off or the hub cannot be reached: then its size is unknown)."""
    local = Path(os.path.expanduser(model_id))
    folder: Path | None = local if local.is_dir() else None
    if folder is None:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "config.json", revision=revision)
        folder = Path(cached).parent if isinstance(cached, str) else None
    size = 0
    if folder is not None:
        for pattern in ("*.safetensors", "*.bin"):
            size += sum(path.stat().st_size for path in folder.glob(pattern))  # stat follows the cache's links
    elif not offline and not local.is_absolute() and not hub.offline() and hub.hub_problem() is None:
        size = hub.listed_weights(model_id, revision) or 0
    return ModelFacts(model_id, folder, size)


def _writable(folder: Path) -> str | None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        return "not writable by this user" if existing == folder else f"cannot be created in {display(existing)}"
    return None


def _folders_under(config: Config) -> int:
    """Folders that need an inotify watch: every folder of the recursive, locally watched trees."""
    from autocaption.watch import is_network_mount

    count = 0
    for watch in config.watch:
        polled = watch.polling == "yes" or (watch.polling == "auto" and is_network_mount(watch.path))
        if polled or not watch.path.is_dir():
            continue
        count += 1
        if watch.recursive:
            count += sum(len(folders) for _, folders, _ in os.walk(watch.path))
    return count


def _inotify_limit() -> int | None:
    """The watches this user may hold: the system's limit, or the lower one of this user namespace (a
    container's)."""
    limits = [
        _read_int(Path(p)) for p in ("/proc/sys/fs/inotify/max_user_watches", "/proc/sys/user/max_inotify_watches")
    ]
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else None


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


def _unit_facts() -> UnitFacts:
    system, user = SYSTEM_UNIT_DIR / UNIT_NAME, Path.home() / ".config/systemd/user" / UNIT_NAME
    path = system if system.is_file() else user if user.is_file() else None
    if path is None:
        return UnitFacts(None, False, None, None, None)
    scope = ["--user"] if path == user else []
    enabled = _systemctl(*scope, "is-enabled", UNIT_NAME)
    shown = _systemctl(*scope, "show", "-p", "ActiveState", "-p", "MainPID", UNIT_NAME) or ""
    values = dict(line.partition("=")[::2] for line in shown.splitlines())
    pid = values.get("MainPID", "")
    main_pid = int(pid) if pid.isdigit() and pid != "0" else None
    return UnitFacts(path, path == user, enabled, values.get("ActiveState"), main_pid)


def _systemctl(*args: str) -> str | None:
    exe = shutil.which("systemctl")
    if exe is None:
        return None
    try:
        result = subprocess.run([exe, *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    output = result.stdout.strip()
    if not output or "not been booted with systemd" in result.stderr or "Failed to connect" in result.stderr:
        return None
    return output


def run(config: Config | None) -> tuple[list[Check], int]:
    """The checks, and the exit code (0 when every one passed). Without a config: the default model and
    state dir, no folders."""
    found = checks(gather(config or defaults()))
    return found, 0 if all(check.ok for check in found) else 1
