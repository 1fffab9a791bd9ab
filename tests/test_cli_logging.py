"""MindSpore fixes its log level when it is first imported, and some commands import it (through the
U-Net module's config checks) before :func:`cytocore.runtime.setup`: the CLI must quiet it first."""
import os

from experiments.cli import run


def _evaluate_missing(tmp_path, *flags):
    return run([*flags, "evaluate", "--data", str(tmp_path / "no-such-data"), "--predictions",
                str(tmp_path / "p.csv"), "--out", str(tmp_path / "m.json")])


def _unset(monkeypatch, *names):
    """Unset for this test, and restored after it (monkeypatch only restores what it saw set)."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_the_cli_quiets_mindspore_before_any_command_runs(tmp_path, monkeypatch):
    _unset(monkeypatch, "GLOG_v", "GLOG_logtostderr", "CYTOFUSE_MS_LOG")
    assert _evaluate_missing(tmp_path) != 0  # fails on its input, after the environment is set
    assert os.environ.get("GLOG_v") == "3"


def test_verbose_keeps_mindspores_own_log(tmp_path, monkeypatch):
    _unset(monkeypatch, "GLOG_v", "GLOG_logtostderr", "CYTOFUSE_MS_LOG")
    _evaluate_missing(tmp_path, "-v")
    assert "GLOG_v" not in os.environ
