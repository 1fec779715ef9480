"""The Debian package: built here, contents checked, installed and run in a throwaway root."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from cellos_probed import __version__
from tests.conftest import IS_ROOT

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(
    not Path("/usr/bin/python3").exists() or shutil.which("dpkg-deb") is None,
    reason="needs Debian's /usr/bin/python3 and dpkg-deb",
)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        ["bash", str(REPO / "packaging" / "build-deb.sh"), str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path.exists()
    return path


def test_package_metadata_and_contents(deb: Path) -> None:
    assert deb.name == f"cellos-probed_{__version__}_{deb.name.rsplit('_', 1)[1]}"
    info = subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True, text=True).stdout
    assert "Package: cellos-probed" in info
    assert f"Version: {__version__}" in info
    assert "libnftables1" in info
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True).stdout
    paths = {line.split()[5].removeprefix(".") for line in listing.splitlines()}
    for expected in (
        "/usr/lib/systemd/system/cellos-probed.service",
        "/usr/lib/systemd/system/cellos-probed@.service",
        "/etc/cellos-probed/cellos-probed.toml",
        "/opt/cellos-probed/bin/cellos-probed",
        "/usr/bin/cellos-probed",
        "/usr/share/doc/cellos-probed/README.md",
    ):
        assert expected in paths, expected
    assert not any(
        "/site-packages/testbed/" in path or "/site-packages/tests/" in path for path in paths
    )
    conffiles = subprocess.run(
        ["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True, check=True
    ).stdout
    assert b"conffiles" in conffiles
    # the unit shipped is the one the tests verify, and nothing gets enabled
    unit = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True
    ).stdout
    assert (REPO / "systemd" / "cellos-probed.service").read_bytes() in unit
    postinst = (REPO / "packaging" / "scripts" / "postinst").read_text()
    assert "enable" not in postinst.replace("enable nothing", "")


@pytest.mark.skipif(not IS_ROOT or shutil.which("unshare") is None, reason="needs root and unshare")
def test_installed_package_runs_check_config(deb: Path, tmp_path: Path) -> None:
    """Extract the package and run it at its real path inside a private mount namespace.

    A tmpfs over /opt exists only in that namespace, so the host is untouched.
    """
    root = tmp_path / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    script = (
        f"set -e; mount -t tmpfs tmpfs /opt; cp -a {root}/opt/cellos-probed /opt/; "
        "/opt/cellos-probed/bin/cellos-probed --version; "
        "/opt/cellos-probed/bin/cellos-probed check-config "
        f"--config {root}/etc/cellos-probed/cellos-probed.toml; "
        "/opt/cellos-probed/bin/cellos-probed once "
        f"--config {root}/etc/cellos-probed/cellos-probed.toml"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"cellos-probed {__version__}"
    assert "OK: 1 cell(s) (cgroup x1, tap_link x1)" in lines[1]
    # one tick of the shipped config: the example cell's cgroup does not exist here
    assert '"type":"dev.cellos.events.cell.observability.host.v1.probe_error"' in lines[2]
    assert not Path("/opt/cellos-probed").exists()
