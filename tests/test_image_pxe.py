"""The example iPXE script boots the image over the network, as a provisioning system would.

QEMU's NIC ROM (iPXE) asks QEMU's DHCP for a boot file, gets a short script
over TFTP that sets the broker, the HTTP base and this boot's labels and chains
images/boot.ipxe exactly as shipped; that fetches vmlinuz and initramfs.img
from an HTTP server on the host's loopback. No edgerun.node is given, so the
agent must name itself after the DMI product UUID; the labels reach its status.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from .brokers import Mosquitto, wait_until
from .mqttkit import Observer, shell
from .test_image_binary import BUILD_TIMEOUT, built_image, load_images_module

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "images" / "out"
ONLINE_TIMEOUT = 400  # iPXE fetches ~22 MB through QEMU's user network first
GUEST_HOST = "10.0.2.2"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(BUILD_TIMEOUT + ONLINE_TIMEOUT)]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *_args: object) -> None:
        pass


@contextmanager
def file_server(directory: Path) -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler,
                                                          directory=str(directory)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def image() -> dict[str, Any]:
    return built_image()


def test_example_ipxe_script_boots_the_image(image: dict[str, Any], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    vm_module = load_images_module("vm")
    web, tftp = tmp_path / "web", tmp_path / "tftp"
    web.mkdir()
    tftp.mkdir()
    for name in ("vmlinuz", "initramfs.img"):
        (web / name).symlink_to(OUT / name)
    shutil.copy(ROOT / "images" / "boot.ipxe", web / "boot.ipxe")
    smbios = {"manufacturer": "edgerun-test", "product": "pxe-vm", "serial": "PXE-1",
              "uuid": str(uuid.uuid4())}
    broker = Mosquitto(tmp_path / "mosquitto").start()
    try:
        with file_server(web) as port, Observer(broker.url) as observer:
            (tftp / "start.ipxe").write_text(
                "#!ipxe\n"
                f"set edgerun-base http://{GUEST_HOST}:{port}/\n"
                f"set edgerun-broker mqtt://{GUEST_HOST}:{broker.port}\n"
                # labels for this boot, as images/README.md shows them set from iPXE
                "set edgerun-extra edgerun.labels=rack=r7,role=storage\n"
                "chain ${edgerun-base}boot.ipxe\n")
            nic = vm_module.Nic("virtio-net-pci", "52:54:00:ed:9e:11", tftp=str(tftp),
                                bootfile="start.ipxe")
            vm = vm_module.VM(pxe=True, nics=[nic], smbios=smbios, memory_mb=512,
                              console=tmp_path / "console.log").start()
            try:
                node = smbios["uuid"]  # lower-case already, and only [0-9a-f-]
                assert wait_until(lambda: bool(observer.of("status", node=node, state="online")),
                                  ONLINE_TIMEOUT, interval=0.1), \
                    f"QEMU: {vm.qemu_output()}\nconsole:\n{vm.log()[-5000:]}"
                online_after = vm.seconds_since_start()
                status = observer.of("status", node=node, state="online")[0]
                assert status["facts"]["labels"] == {"rack": "r7", "role": "storage"}
                observer.send(node, shell("cmdline", "cat /proc/cmdline"))
                final = observer.final("cmdline", 120)
                assert final["state"] == "succeeded", final
                assert f"edgerun.broker=mqtt://{GUEST_HOST}:{broker.port}" in final["stdout"]
                assert "initrd=initramfs.img" in final["stdout"]  # the script's kernel line
            finally:
                vm.stop()
                (OUT / "pxe-console.log").write_text(vm.log())
    finally:
        broker.stop()
    with capsys.disabled():
        print(f"\nPXE boot ({vm.accel}): power-on to online in {online_after:.1f} s")
