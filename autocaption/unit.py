"""The systemd unit: rendered for the user's folders by `autocaption service install`.

A system unit with a dedicated user is the recommended setup: sandboxing in user units needs user
namespaces and was silently ignored by older systemd. The sandbox is as tight as a GPU daemon allows:
no PrivateDevices (it hides the GPU), no MemoryDenyWriteExecute (torch/triton generate code), no
ProcSubset=pid (torch reads /proc/cpuinfo and /proc/meminfo).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from autocaption.config import Config
from autocaption.engine import hub
from autocaption.errors import ConfigError
from autocaption.paths import display

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
UNIT_NAME = "autocaption.service"

TEMPLATE = """\
# autocaption: describe new photos with a local vision-language model.
# Rendered by `autocaption service install`; edit the config, not this file, and render again.
[Unit]
Description=autocaption - describe new photos with a local vision-language model
After=local-fs.target remote-fs.target network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
{identity}ExecStart={exe} run --config {config}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=10
# Loading a 15 GB model from a slow disk takes minutes; the worker pings the watchdog between batches.
TimeoutStartSec=900
TimeoutStopSec=90
WatchdogSec=600
KillMode=mixed
StateDirectory=autocaption
Environment={hf_home}
Environment=PYTHONUNBUFFERED=1
{environment_file}
# AMD consumer/APU GPUs may need e.g. HSA_OVERRIDE_GFX_VERSION=11.0.0; pick cards with HIP_VISIBLE_DEVICES.
#Environment=HSA_OVERRIDE_GFX_VERSION=11.0.0
#Environment=HIP_VISIBLE_DEVICES=0
ReadWritePaths={read_write}
UMask=0022

# GPU access: AMD ROCm (/dev/kfd, /dev/dri) and NVIDIA. Load the GPU modules at boot: char-* classes
# are resolved when the service starts.
DevicePolicy=closed
DeviceAllow=char-kfd rw
DeviceAllow=char-drm rw
DeviceAllow=char-nvidiactl rw
DeviceAllow=char-nvidia-frontend rw
DeviceAllow=char-nvidia-uvm rw
DeviceAllow=char-nvidia-caps rw

# Sandbox.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
CapabilityBoundingSet=
AmbientCapabilities=
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged
SystemCallErrorNumber=EPERM
IPAddressDeny=multicast

[Install]
WantedBy={wanted_by}
"""


USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,30}\$?")  # what useradd and systemd's strict check both take


def _quote(path: Path, *, argument: bool = False) -> str:
    """A path as a unit file reads it: `%` is a specifier (doubled to stay itself), and in a command line's
    arguments `$` names a variable (doubled too); quoted, with quotes and backslashes escaped, when it holds
    white space or either. A line break cannot be written in a unit at all."""
    text = str(path)
    if "\n" in text or "\r" in text:
        raise ConfigError(f"{display(path)}: a path with a line break cannot be written into a systemd unit")
    text = text.replace("%", "%%")
    if argument:
        text = text.replace("$", "$$")
    if any(ch.isspace() or ch in "\"\\'" for ch in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _executable(path: Path) -> str:
    """The program of ExecStart=: systemd substitutes nothing in it but specifiers, and refuses quotes and
    backslashes in its name whatever the quoting."""
    if any(ch in str(path) for ch in "\"'\\"):
        raise ConfigError(f"{display(path)}: systemd cannot start a program whose path holds quotes or "
                          "backslashes; install autocaption in a folder without them")  # fmt: skip
    return _quote(path)


def render(config: Config, *, user: bool, run_as: str, command: str) -> str:
    folders = sorted({w.path for w in config.watch})  # resolved when the config was read
    state = config.state.dir
    if not user and not os.environ.get("STATE_DIRECTORY") and state.is_absolute():
        folders.append(state)  # an explicit state.dir outside StateDirectory= must stay writable
    identity = "" if user else f"User={run_as}\nGroup={run_as}\nSupplementaryGroups=render video\n"
    # A system service has a cache of its own; a user's service uses the user's (the model they may have
    # downloaded already: 15 GB not fetched twice), writable through ProtectHome=read-only.
    hf_home = "HF_HOME=%S/autocaption/huggingface"
    read_write = [_quote(p) for p in folders]
    if user:
        cache = Path(hub.home()).expanduser()
        hf_home = _quote(Path(f"HF_HOME={cache}"))
        read_write.append("-" + _quote(cache))  # "-": a cache not made yet is no reason to refuse to start
    return TEMPLATE.format(
        identity=identity,
        exe=command,
        config=_quote(config.source, argument=True),
        hf_home=hf_home,
        read_write=" ".join(read_write) or "%S/autocaption",
        wanted_by="default.target" if user else "multi-user.target",
        environment_file=(
            f"# {config.model.api_key_env}=<the API key>, read by systemd (mode 600)\n"
            f"EnvironmentFile=-{_key_file(user)}"
        )
        if config.model.api_key_env
        else "",
    )


def _key_file(user: bool) -> str:
    """Where the unit reads the remote server's API key from (model.api_key_env): outside the config."""
    return "%h/.config/autocaption/autocaption.env" if user else "/etc/autocaption/autocaption.env"


def _command() -> str:
    """How to start this very installation: the script beside the running interpreter (a venv's
    bin/autocaption), else `python -m autocaption` with this interpreter."""
    sibling = Path(sys.executable).parent / "autocaption"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return _executable(sibling)
    found = shutil.which("autocaption")
    if found:
        return _executable(Path(found))
    return f"{_executable(Path(sys.executable))} -m autocaption"


def check_paths_for(config: Config, run_as: str) -> None:
    """A system unit runs as `run_as`, whose `~` and environment are not the installing user's: a path written
    with them would name other folders there (`~/Pictures` -> /var/lib/autocaption/Pictures) than the ones
    this unit opens for writing. Refuse with the first such path rather than render a unit that lies."""
    if not config.user_paths:
        return
    first = config.user_paths[0]
    more = len(config.user_paths) - 1
    raise ConfigError(
        f"{first.where}: {first.written!r} is {display(first.expanded)} for you, but the service runs as "
        f"{run_as!r} with another home and environment; write the absolute path in the config for a system "
        f"service (or install a --user unit){f' ({more} more such path(s))' if more else ''}"
    )


def install(config: Config, *, user: bool, unit_dir: Path | None, run_as: str) -> str:
    """Write the unit and return what to run next."""
    if not user:
        if not USER_NAME.fullmatch(run_as):
            raise ConfigError(f"--run-as {run_as!r}: not a user name (lower-case letters, digits, '-' and '_')")
        check_paths_for(config, run_as)
    directory = unit_dir or (Path.home() / ".config/systemd/user" if user else SYSTEM_UNIT_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / UNIT_NAME
    target.write_text(render(config, user=user, run_as=run_as, command=_command()), encoding="utf-8")
    folders = " ".join(shlex.quote(str(w.path)) for w in config.watch)
    who = shlex.quote(run_as)
    if user:
        steps = [
            "systemctl --user daemon-reload",
            "systemctl --user enable --now autocaption",
            f"loginctl enable-linger {os.environ.get('USER', '$USER')}   # start at boot, not at login",
            "journalctl --user -u autocaption -f",
        ]
    else:
        steps = [
            f"sudo useradd --system --home-dir /var/lib/autocaption --shell /usr/sbin/nologin {who}",
            f"sudo usermod -aG render,video {who}   # GPU access (ROCm needs render)",
            f"sudo setfacl -R -m u:{who}:rwX -m d:u:{who}:rwX {folders}   # or group permissions",
            "sudo systemctl daemon-reload",
            "sudo systemctl enable --now autocaption",
            "journalctl -u autocaption -f",
        ]
    variable = config.model.api_key_env
    if variable:  # the service does not see the installing shell's environment: the key goes into a file
        where = _key_file(user).replace("%h", "~")
        sudo = "" if user else "sudo "
        steps[:0] = [
            f"{sudo}install -D -m 600 /dev/null {where}   # the unit reads {variable} from it",
            f"echo '{variable}=<the API key>' | {sudo}tee {where} >/dev/null",
        ]
    return f"wrote {display(target)}\nnext:\n" + "\n".join(f"  {step}" for step in steps)
