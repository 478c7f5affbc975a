"""fastpunch.read_credentials: the file `ccs add-device` writes, read with
a clear error for every way it can be wrong, never a traceback."""

from __future__ import annotations

import ast
import json
import os

import pytest

import fastpunch
from fastpunch import FastpunchError, read_credentials

KEY = bytes(range(32))


def write(tmp_path, data) -> str:
    p = tmp_path / "creds.json"
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(p)


def test_the_add_device_file_and_a_bare_hex_key_read_back(tmp_path):
    path = write(tmp_path, json.dumps({"name": "camera-1", "key": KEY.hex()}))
    assert read_credentials(path) == ("camera-1", KEY)
    assert read_credentials(path, "camera-1") == ("camera-1", KEY)
    assert read_credentials(write(tmp_path, KEY.hex() + "\n"), "anyone") == (None, KEY)


def test_another_devices_credentials_are_refused_by_name(tmp_path):
    path = write(tmp_path, json.dumps({"name": "camera-1", "key": KEY.hex()}))
    with pytest.raises(FastpunchError, match="holds the credentials of 'camera-1', not 'viewer'"):
        read_credentials(path, "viewer")


@pytest.mark.parametrize("data", [
    "", "not hex", '{"name": "x"}', '{"key": "zz"}', '{"name": 5, "key": "00"}',
    '["00"]', '{"key": ""}', b"\xff\xfe\x00", "0" * (65 * 1024)])
def test_a_file_that_is_not_credentials_is_a_clear_error(tmp_path, data):
    path = write(tmp_path, data)
    with pytest.raises(FastpunchError) as err:
        read_credentials(path)
    assert path in str(err.value)
    assert "credentials" in str(err.value)


def test_an_unreadable_file_names_itself(tmp_path):
    missing = os.path.join(str(tmp_path), "nope.json")
    with pytest.raises(FastpunchError, match="nope.json: cannot read the credentials"):
        read_credentials(missing)
    with pytest.raises(FastpunchError, match="cannot read"):
        read_credentials(str(tmp_path))              # a directory


def test_the_camera_command_uses_the_public_api_only():
    # the lab demo's camera doubles as the example of a program of your own
    import fastpunch.camera as camera

    tree = ast.parse(open(camera.__file__).read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for a in node.names}
    ours = {m for m in imported if m and m.split(".")[0] == "fastpunch"}
    assert ours == {"fastpunch"}, ours
    names = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
             and node.module == "fastpunch" for a in node.names}
    assert names <= set(fastpunch.__all__), names


def test_the_camera_command_is_installed_with_its_defaults_in_help(capsys):
    from fastpunch.cli import main

    with pytest.raises(SystemExit) as done:
        main(["camera", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--source" in out and "testsrc" in out and "--max-viewers" in out
    assert "(default: auto)" in out

