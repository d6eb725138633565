"""The Dovecot files ship in the wheel, and an installed mailhub names them.

``pip install`` used to leave the Lua script out while the docs pointed at a
path nothing installed. These build the wheel, install it into a folder of
its own and run ``mailhub dovecot-config`` from there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from mailhub.push.dovecot_config import lua_script_path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ["mailhub-push.lua", "10-mailhub-push.conf", "10-mailhub-push-2.4.conf"]


def test_contrib_links_to_the_one_copy_in_the_package() -> None:
    for name in SHIPPED:
        contrib = ROOT / "contrib" / "dovecot" / name
        assert contrib.is_symlink(), name
        assert contrib.resolve() == (ROOT / "mailhub" / "data" / "dovecot" / name).resolve()
    assert lua_script_path().resolve() == (ROOT / "contrib" / "dovecot" / SHIPPED[0]).resolve()


def test_installed_wheel_has_the_script_and_dovecot_config_names_it(tmp_path: Path, mailhub_wheel: Path) -> None:
    wheel = mailhub_wheel
    names = zipfile.ZipFile(wheel).namelist()
    for name in SHIPPED:
        assert "mailhub/data/dovecot/%s" % name in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    config = tmp_path / "mailhub.ini"
    config.write_text("[push]\nusername = dovecot\npassword = push-s3cret\n")
    # -S: the checkout (on sys.path through the editable install) is not seen.
    path = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])
    done = subprocess.run([sys.executable, "-S", "-c",
                           "import sys; from mailhub.cli import main; sys.exit(main())",
                           "dovecot-config", "--config", str(config)],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=path),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    installed = target / "mailhub" / "data" / "dovecot" / "mailhub-push.lua"
    assert "  push_notification_driver = lua:file=%s\n" % installed in done.stdout
    assert installed.read_bytes() == lua_script_path().read_bytes()
