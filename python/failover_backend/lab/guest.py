"""A tiny Linux guest for failover experiments, built from Debian packages.

Kernel: Debian's standard ``linux-image-amd64`` flavour (the *cloud* flavour lacks
e1000e), unpacked with ``dpkg-deb -x``, never installed. Userland: ``busybox-static``,
and ``udp-sink`` (``udp_sink.c``, built static here), a UDP receiver busybox lacks.
The initramfs carries virtio_pci, virtio_net, failover, net_failover and e1000e (the
emulated primary), with their dependencies as ``modprobe --show-depends`` lists them,
and an ``/init`` (``guest_init.sh``) that brings the failover master up and serves
commands on the serial console.

Downloads and images are cached under ``cache_dir()``: packages by file name (which
carries the version), images by the hash of everything that goes into them, so a
rebuild happens only when an input changed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

#: Modules the guest needs, in load order once dependencies are added.
GUEST_MODULES = ("virtio_pci", "failover", "net_failover", "virtio_net", "e1000e")
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
INIT_SCRIPT = Path(__file__).with_name("guest_init.sh")
#: A UDP receiver for the guest (busybox has none), built static on the host.
UDP_SINK = Path(__file__).with_name("udp_sink.c")


class GuestImageError(RuntimeError):
    """The guest image could not be built (the message says which step failed)."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_version: str


def cache_dir() -> Path:
    """``$FAILOVER_BACKEND_CACHE`` or ``~/.cache/failover-backend``."""
    configured = os.environ.get("FAILOVER_BACKEND_CACHE")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "failover-backend"


def _run(*argv: str, cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise GuestImageError(f"{argv[0]} not found (install it: ./dev setup)") from err
    except subprocess.CalledProcessError as err:
        raise GuestImageError(
            f"{' '.join(argv)} failed ({err.returncode}): {err.stderr.strip()}"
        ) from err
    return result.stdout


def _kernel_package() -> str:
    """The versioned image package the meta package points at (linux-image-X-amd64)."""
    for line in _run("apt-cache", "depends", KERNEL_META_PACKAGE).splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-") and line.endswith("-amd64"):
            return line.split()[1]
    raise GuestImageError(f"apt-cache knows no kernel behind {KERNEL_META_PACKAGE}")


def _download(package: str, into: Path) -> Path:
    """The package's .deb, downloaded once per version."""
    into.mkdir(parents=True, exist_ok=True)
    pattern = f"{package}_*.deb"
    version = ""
    for line in _run("apt-cache", "policy", package).splitlines():
        if line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip().replace(":", "%3a")
    if version:
        cached = into / f"{package}_{version}_amd64.deb"
        if cached.exists():
            return cached
    with tempfile.TemporaryDirectory(dir=into) as tmp:
        logger.info("downloading %s", package)
        _run("apt-get", "download", "-o", "APT::Sandbox::User=root", package, cwd=Path(tmp))
        debs = list(Path(tmp).glob(pattern))
        if len(debs) != 1:
            raise GuestImageError(f"apt-get download {package} gave {debs}")
        target = into / debs[0].name
        debs[0].replace(target)
        return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _module_files(root: Path, kernel_version: str) -> list[Path]:
    """Module files in load order, dependencies first, each once."""
    _run("depmod", "-b", str(root), kernel_version)
    ordered: list[Path] = []
    for module in GUEST_MODULES:
        out = _run("modprobe", "-d", str(root), "-S", kernel_version, "--show-depends", module)
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == "insmod":
                path = Path(parts[1])
                if path not in ordered:
                    ordered.append(path)
    return ordered


def _build(kernel_deb: Path, busybox_deb: Path, out: Path) -> GuestImage:
    with tempfile.TemporaryDirectory(prefix="fb-guest-") as tmp:
        work = Path(tmp)
        kernel_root, busybox_root, initramfs = work / "kernel", work / "busybox", work / "initramfs"
        _run("dpkg-deb", "-x", str(kernel_deb), str(kernel_root))
        _run("dpkg-deb", "-x", str(busybox_deb), str(busybox_root))
        versions = [p.name for p in (kernel_root / "lib" / "modules").iterdir()]
        if len(versions) != 1:
            raise GuestImageError(f"{kernel_deb.name}: expected one kernel, found {versions}")
        kernel_version = versions[0]

        for sub in ("bin", "etc", "lib/modules"):
            (initramfs / sub).mkdir(parents=True)
        shutil.copy2(busybox_root / "bin" / "busybox", initramfs / "bin" / "busybox")
        shutil.copy2(INIT_SCRIPT, initramfs / "init")
        _run("gcc", "-static", "-O2", "-o", str(initramfs / "bin" / "udp-sink"), str(UDP_SINK))
        (initramfs / "init").chmod(0o755)
        names = []
        for module in _module_files(kernel_root, kernel_version):
            shutil.copy2(module, initramfs / "lib" / "modules" / module.name)
            names.append(module.name)
        (initramfs / "etc" / "fb-modules").write_text("\n".join(names) + "\n")

        staging = Path(tempfile.mkdtemp(prefix=".building-", dir=out.parent))
        try:
            files = _run("find", ".", cwd=initramfs)
            with (staging / "initrd.img").open("wb") as initrd:
                cpio = subprocess.run(
                    ["cpio", "-o", "-H", "newc", "--quiet"],
                    cwd=initramfs,
                    input=files.encode(),
                    capture_output=True,
                    check=True,
                )
                initrd.write(cpio.stdout)
            kernel = kernel_root / "boot" / f"vmlinuz-{kernel_version}"
            shutil.copy2(kernel, staging / "vmlinuz")
            (staging / "kernel-version").write_text(kernel_version)
            staging.replace(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return _image_at(out)


def _image_at(out: Path) -> GuestImage:
    return GuestImage(
        kernel=out / "vmlinuz",
        initrd=out / "initrd.img",
        kernel_version=(out / "kernel-version").read_text().strip(),
    )


def build_guest_image(cache: Path | None = None) -> GuestImage:
    """The guest's kernel and initramfs, built once per set of inputs.

    :raise GuestImageError: When a package cannot be fetched or a build step fails.
    """
    cache = cache or cache_dir()
    debs = cache / "debs"
    kernel_deb = _download(_kernel_package(), debs)
    busybox_deb = _download(BUSYBOX_PACKAGE, debs)
    key = hashlib.sha256()
    for part in (
        _sha256(kernel_deb),
        _sha256(busybox_deb),
        _sha256(INIT_SCRIPT),
        _sha256(UDP_SINK),
    ):
        key.update(part.encode())
    key.update(" ".join(GUEST_MODULES).encode())
    out = cache / "guest" / f"{kernel_deb.name.split('_')[0]}-{key.hexdigest()[:16]}"
    if (out / "kernel-version").exists():
        return _image_at(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building the guest image in %s", out)
    return _build(kernel_deb, busybox_deb, out)
