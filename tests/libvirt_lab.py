"""libvirtd daemons of the tests' own, and the tiny guest as a libvirt domain.

Each daemon runs in a mount namespace of its own: its configuration, runtime, state,
log and cache directories, and a passwd/group that name the ``libvirt-qemu`` user its
QEMU driver looks up, are bind-mounted from a scratch folder, so two daemons on one
host act as two hosts (distinct ``host_uuid``, distinct migration ports) and neither
touches the host's libvirt. QEMU runs as root without libvirt's security drivers: the
backends' sockets are root's.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

from failover_backend.lab.guest import GuestImage

LIBVIRTD = "/usr/sbin/libvirtd"

#: Bind-mounted over these, from folders of the daemon's own.
_PRIVATE_DIRS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
    "cache": "/var/cache/libvirt",
}


class Libvirtd:
    """One libvirtd, as if on a host of its own.

    :param index: Picks its migration ports (``49152 + 100 * index`` on).
    """

    def __init__(self, root: Path, index: int) -> None:
        self.root = root
        self.index = index
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.root / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    @property
    def tcp_port(self) -> int:
        return 16600 + self.index

    @property
    def tcp_uri(self) -> str:
        """Over TCP on loopback, unauthenticated: a peer-to-peer migration needs a
        destination URI naming a host (libvirt refuses a local one as "the same
        host"), and libvirt's unix transport takes none."""
        return f"qemu+tcp://127.0.0.1:{self.tcp_port}/system"

    @property
    def log_path(self) -> Path:
        return self.root / "libvirtd.log"

    def qemu_log(self, domain: str) -> str:
        path = self.root / "log" / "qemu" / f"{domain}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _write_config(self) -> None:
        for name in _PRIVATE_DIRS:
            (self.root / name).mkdir(parents=True, exist_ok=True)
        first = 49152 + 100 * self.index
        (self.root / "etc" / "libvirtd.conf").write_text(
            f'host_uuid = "{uuid.uuid4()}"\n'
            'auth_unix_ro = "none"\nauth_unix_rw = "none"\nunix_sock_rw_perms = "0700"\n'
            'listen_tls = 0\nlisten_tcp = 1\nauth_tcp = "none"\nlisten_addr = "127.0.0.1"\n'
            f'tcp_port = "{self.tcp_port}"\n'
            'log_outputs = "3:stderr"\n'
        )
        (self.root / "etc" / "qemu.conf").write_text(
            'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n'
            'security_driver = "none"\nnamespaces = []\ncgroup_controllers = []\n'
            'stdio_handler = "file"\n'
            f"migration_port_min = {first}\nmigration_port_max = {first + 99}\n"
        )
        passwd = Path("/etc/passwd").read_text()
        group = Path("/etc/group").read_text()
        if "\nlibvirt-qemu:" not in "\n" + passwd:
            passwd += "libvirt-qemu:x:64055:64055:libvirt qemu:/var/lib/libvirt:/usr/sbin/nologin\n"
        if "\nlibvirt-qemu:" not in "\n" + group:
            group += "libvirt-qemu:x:64055:\n"
        (self.root / "passwd").write_text(passwd)
        (self.root / "group").write_text(group)

    async def start(self, timeout: float = 30) -> None:
        self._write_config()
        mounts = [
            f"mount --bind {self.root / name} {target}" for name, target in _PRIVATE_DIRS.items()
        ]
        mounts += [
            f"mount --bind {self.root / 'passwd'} /etc/passwd",
            f"mount --bind {self.root / 'group'} /etc/group",
        ]
        for target in _PRIVATE_DIRS.values():
            Path(target).mkdir(parents=True, exist_ok=True)
        pid_file = self.root / "libvirtd.pid"
        script = (
            "set -e\n" + "\n".join(mounts) + f"\nexec {LIBVIRTD} --listen --pid-file {pid_file}\n"
        )
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = asyncio.get_running_loop().time() + timeout
        while not self.socket.exists():
            if self.process.poll() is not None or asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(
                    f"libvirtd {self.index} did not start:\n{self.log_path.read_text()[-3000:]}"
                )
            await asyncio.sleep(0.1)

    def virsh(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        result = subprocess.run(
            ["virsh", "-c", self.uri, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    async def stop(self) -> None:
        if self.process is None:
            return
        for name in self.virsh("list", "--name", check=False).split():
            self.virsh("destroy", name, check=False)
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.process.wait, 30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait, 10)
        self.process = None


def tiny_domain(
    name: str,
    image: GuestImage,
    *,
    standby_socket: Path,
    mac: str,
    serial: Path | None = None,
    guest_address: str = "10.77.0.2/24",
    guest_ignores_unplug: bool = False,
) -> str:
    """The lab's tiny guest as a domain: a vhost-user teaming standby on
    ``standby_socket`` (QEMU connects, reconnecting every second) and an emulated e1000e
    primary (libvirt's teaming takes hostdevs only: ``failover_pair_id`` comes from a
    ``<qemu:override>``), on guest RAM from memfd, shared; ``vectors=0`` on the
    standby, which QEMU 7.2 needs under TCG."""
    # The guest's console on a socket, when asked (two daemons of one host would
    # bind the same path: leave it out of a domain that migrates).
    serial_xml = (
        f"<serial type='unix'><source mode='bind' path='{serial}'/></serial>" if serial else ""
    )
    cmdline = f"console=ttyS0 net.ifnames=0 panic=-1 quiet fb.ip={guest_address}"
    if guest_ignores_unplug:
        cmdline += " acpiphp.disable=1"
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{image.kernel}</kernel>
    <initrd>{image.initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='custom'><model>qemu64</model></cpu>
  <on_reboot>destroy</on_reboot>
  <devices>
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='pci' index='1' model='pcie-root-port'/>
    <controller type='pci' index='2' model='pcie-root-port'/>
    <controller type='pci' index='3' model='pcie-root-port'/>
    <interface type='vhostuser'>
      <mac address='{mac}'/>
      <source type='unix' path='{standby_socket}' mode='client'>
        <reconnect enabled='yes' timeout='1'/>
      </source>
      <model type='virtio'/>
      <teaming type='persistent'/>
      <alias name='ua-standby0'/>
      <address type='pci' bus='2' slot='0'/>
    </interface>
    <interface type='user'>
      <mac address='{mac}'/>
      <model type='e1000e'/>
      <rom enabled='no'/>
      <alias name='ua-primary0'/>
      <address type='pci' bus='1' slot='0'/>
    </interface>
    {serial_xml}
    <memballoon model='none'/>
  </devices>
  <qemu:override>
    <qemu:device alias='ua-standby0'>
      <qemu:frontend><qemu:property name='vectors' type='unsigned' value='0'/></qemu:frontend>
    </qemu:device>
    <qemu:device alias='ua-primary0'>
      <qemu:frontend>
        <qemu:property name='failover_pair_id' type='string' value='ua-standby0'/>
      </qemu:frontend>
    </qemu:device>
  </qemu:override>
</domain>
"""


def require_libvirtd() -> None:
    missing = [tool for tool in (LIBVIRTD, "virsh", "unshare") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"missing {missing}: ./dev setup installs libvirt-daemon")
