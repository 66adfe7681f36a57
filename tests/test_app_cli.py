"""app.py flags: the Train tab is off when the app serves the network unless --train says otherwise."""

from __future__ import annotations

import pytest

import app


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("SPACE_ID", "MULTICRAFTER_DISABLE_TRAIN", "MULTICRAFTER_TRAIN", "GRADIO_SERVER_NAME"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("argv,enabled", [
    ([], True),                                            # 127.0.0.1 by default
    (["--host", "localhost"], True),
    (["--host", "::1"], True),
    (["--host", "0.0.0.0"], False),
    (["--host", "192.168.1.5"], False),
    (["--host", "myhost.example"], False),
    (["--host", "0.0.0.0", "--train"], True),
    (["--train", "--no-train"], False),
    (["--no-train"], False),
])
def test_train_tab_follows_the_host(argv, enabled, capsys):
    args = app.build_parser().parse_args(argv)
    assert app.train_enabled(args) is enabled
    err = capsys.readouterr().err
    if "--no-train" in argv or enabled:
        assert err == ""
    else:
        assert err.count("\n") == 1 and "Train tab is disabled" in err and "--train" in err


def test_environment_opt_in_and_spaces(monkeypatch, capsys):
    monkeypatch.setenv("MULTICRAFTER_TRAIN", "1")
    assert app.train_enabled(app.build_parser().parse_args(["--host", "0.0.0.0"]))
    monkeypatch.delenv("MULTICRAFTER_TRAIN")
    monkeypatch.setenv("SPACE_ID", "user/space")
    assert not app.train_enabled(app.build_parser().parse_args(["--host", "0.0.0.0"]))
    monkeypatch.setenv("MULTICRAFTER_DISABLE_TRAIN", "0")   # a Space owner's explicit opt-in still works
    assert app.train_enabled(app.build_parser().parse_args(["--host", "0.0.0.0"]))
    capsys.readouterr()
