"""The `llmdist` command: --version, info (text and JSON), the runtime flags, user errors as one
line with exit status 2 (found before any work; --debug adds the traceback), and logging."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

import llmdist
from llmdist import cli, logs

HERE = Path(__file__).resolve().parent
NO_LIBRARY = "/nonexistent/llmdist-test/libvendor.so"


def run(*args, env=None, timeout=120):
    """`python -m llmdist ARGS` from the directory above tests/ (a checkout, or a copy of the
    tests beside an installed wheel), with the host runtime unless env says otherwise."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("LLMDIST_")}
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "llmdist", *args],
        cwd=HERE.parent,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line_error(res, *fragments):
    """The run failed with exit status 2 and one line on stderr holding every fragment."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("llmdist: error: "), lines[0]
    assert "Traceback" not in res.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def test_version():
    res = run("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"llmdist {llmdist.__version__}"


def test_console_script_is_the_cli():
    if Path(llmdist.__file__).resolve().parent.parent.name not in (
        "site-packages",
        "dist-packages",
    ):
        pytest.skip("the imported llmdist is not an installed one (the tests run from a checkout)")
    dist = metadata.distribution("llmdist")
    scripts = [ep for ep in dist.entry_points if ep.group == "console_scripts"]
    assert [(ep.name, ep.value) for ep in scripts] == [("llmdist", "llmdist.cli:main")]
    exe = Path(sysconfig.get_path("scripts")) / "llmdist"
    res = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == f"llmdist {llmdist.__version__}"


def test_info_text_names_each_runtime_and_why_not():
    res = run("info", env={"LLMDIST_ACL_LIBRARY": NO_LIBRARY, "LLMDIST_CUDA_LIBRARY": NO_LIBRARY})
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith(f"llmdist {llmdist.__version__} on CPython ")
    assert "active runtime: host" in out
    assert "  host  available: version 1, (built in)" in out
    for name in ("acl", "cuda"):
        line = next(ln for ln in out.splitlines() if ln.startswith(f"  {name} "))
        assert "not available" in line and NO_LIBRARY in line


def test_info_json_is_runtime_info():
    res = run(
        "info",
        "--json",
        env={"LLMDIST_ACL_LIBRARY": NO_LIBRARY, "LLMDIST_CUDA_LIBRARY": NO_LIBRARY},
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["llmdist"] == llmdist.__version__
    assert data["active"] == "host"
    assert data["runtimes"]["host"]["available"] is True
    for name in ("acl", "cuda"):
        assert data["runtimes"][name]["available"] is False
        assert NO_LIBRARY in data["runtimes"][name]["reason"]
    assert set(data["peers"]) >= {"mooncake", "nixl"}


def test_runtime_flag_sets_the_runtime():
    res = run("--runtime", "host", "info", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["active"] == "host"
    # after the command name too
    res = run("info", "--json", "--runtime", "host")
    assert res.returncode == 0, res.stderr


def test_unknown_runtime_in_environment():
    one_line_error(
        run("demo", env={"LLMDIST_RUNTIME": "ascend"}),
        "LLMDIST_RUNTIME must be one of auto, host, acl, cuda",
        "'ascend'",
    )


def test_unknown_runtime_flag():
    one_line_error(run("demo", "--runtime", "ascend"), "--runtime", "invalid choice", "'ascend'")


@pytest.mark.parametrize(
    "name,var", [("acl", "LLMDIST_ACL_LIBRARY"), ("cuda", "LLMDIST_CUDA_LIBRARY")]
)
@pytest.mark.parametrize("how", ["flag", "env"])
def test_device_runtime_unavailable_names_the_loaders_reason(name, var, how):
    env = {var: NO_LIBRARY}
    if how == "env":
        env["LLMDIST_RUNTIME"] = name
        args = ["demo"]
    else:
        args = ["demo", "--runtime", name]
    one_line_error(run(*args, env=env), f"the {name} runtime is not available", NO_LIBRARY)


def test_debug_shows_the_traceback():
    res = run("--debug", "demo", "--runtime", "acl", env={"LLMDIST_ACL_LIBRARY": NO_LIBRARY})
    assert res.returncode == 2
    assert "Traceback" in res.stderr
    assert res.stderr.splitlines()[-1].startswith(
        "llmdist: error: the acl runtime is not available"
    )


@pytest.mark.parametrize(
    "args,fragments",
    [
        (["bench", "--bogus"], ["unrecognized arguments: --bogus"]),
        (["demo", "--layers", "x"], ["--layers", "invalid int value"]),
        (["nothing"], ["invalid choice: 'nothing'"]),
        (["--device", "-1", "info"], ["--device must be >= 0"]),
    ],
)
def test_bad_options(args, fragments):
    one_line_error(run(*args), *fragments)


def test_bad_device_in_environment():
    one_line_error(run("info", env={"LLMDIST_DEVICE": "first"}), "LLMDIST_DEVICE", "'first'")


def test_bench_json_unwritable_is_refused_before_the_run(tmp_path):
    target = tmp_path / "missing" / "run.json"
    res = run("bench", "--json", str(target))
    one_line_error(res, "--json", str(target), "cannot be written")
    assert res.stdout == ""  # no table: nothing ran


def test_bench_json_directory_is_refused(tmp_path):
    one_line_error(run("bench", "--json", str(tmp_path)), "--json", "is a directory")


@pytest.fixture
def cli_logging(monkeypatch):
    """cli.main run in this process sets up the package logger (a handler on this test's
    captured stderr): put the logger back afterwards."""
    logger = logging.getLogger("llmdist")
    monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setattr(logs, "_cli_handler", None)
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    return logger


def test_bench_plot_without_matplotlib_is_refused_before_the_run(
    monkeypatch, capsys, tmp_path, cli_logging
):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    ran = []
    monkeypatch.setattr(cli, "_bench_run", lambda args: ran.append(args) or 0)
    assert cli.main(["bench", "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert err == "llmdist: error: --plot needs matplotlib: pip install 'llmdist[plot]'\n"
    assert not (tmp_path / "p.png").exists()


def test_bench_outputs_checked_without_leaving_files(tmp_path):
    import argparse

    args = argparse.Namespace(json=str(tmp_path / "run.json"), plot=None)
    cli.check_bench_outputs(args)
    assert list(tmp_path.iterdir()) == []


def test_bench_header_says_why_auto_chose_the_runtime():
    res = run(
        "bench",
        "b2b",
        "--blocks",
        "4K",
        "--layers",
        "1",
        "--pairs",
        "4",
        "--repeat",
        "1",
        "--quiet",
        env={"LLMDIST_ACL_LIBRARY": NO_LIBRARY, "LLMDIST_CUDA_LIBRARY": NO_LIBRARY},
    )
    assert res.returncode == 0, res.stderr
    line = res.stdout.splitlines()[1]
    assert line.startswith("runtime: auto chose host because acl: "), line
    assert "; cuda: " in line and line.count(NO_LIBRARY) == 2


def test_bench_header_names_an_explicit_runtime():
    from llmdist.bench import runtime_choice

    info = {"active": "host", "runtimes": {}}
    os.environ["LLMDIST_RUNTIME"] = "host"
    try:
        assert runtime_choice(info) == "runtime: host, chosen by LLMDIST_RUNTIME=host"
    finally:
        del os.environ["LLMDIST_RUNTIME"]


# ------------------------------------------------------------------------------------------
# Logging


def test_package_logger_has_a_null_handler_and_modules_log_under_it():
    handlers = logging.getLogger("llmdist").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)
    from llmdist import allocator, cluster, rank_table, releases

    for mod in (allocator, releases, cluster, rank_table):
        assert mod.log.name == mod.__name__ and mod.log.name.startswith("llmdist.")


def probe(code, env):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("LLMDIST_", "MC_LOG"))}
    e.update(env)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=HERE.parent,
        env=e,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "value,level", [("DEBUG", logging.DEBUG), ("info", logging.INFO), ("30", 30)]
)
def test_log_level_from_environment(value, level):
    res = probe(
        "import logging, llmdist; print(logging.getLogger('llmdist').level)",
        {"LLMDIST_LOG_LEVEL": value},
    )
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) == level


def test_bad_log_level_is_a_warning_at_import():
    code = (
        "import logging, warnings; warnings.simplefilter('error', RuntimeWarning)\n"
        "try:\n    import llmdist\nexcept RuntimeWarning as w:\n    print('warned:', w)"
    )
    res = probe(code, {"LLMDIST_LOG_LEVEL": "loud"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (
        "warned: LLMDIST_LOG_LEVEL must be one of DEBUG, INFO, WARNING, "
        "ERROR, CRITICAL or a number, got 'loud'; ignored"
    )
    # with the default filters the import goes on, the level stays unset
    res = probe(
        "import logging, llmdist; print(logging.getLogger('llmdist').level)",
        {"LLMDIST_LOG_LEVEL": "loud"},
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "0"
    assert "RuntimeWarning: LLMDIST_LOG_LEVEL must be one of" in res.stderr


def test_bad_log_level_is_a_cli_error():
    res = run("info", env={"LLMDIST_LOG_LEVEL": "loud", "PYTHONWARNINGS": "ignore::RuntimeWarning"})
    one_line_error(res, "LLMDIST_LOG_LEVEL must be one of DEBUG, INFO", "got 'loud'")
    assert res.stdout == ""
    # without the filter, the import's warning comes first, then the same one-line error
    res = run("info", env={"LLMDIST_LOG_LEVEL": "loud"})
    assert res.returncode == 2 and res.stdout == "" and "Traceback" not in res.stderr
    assert res.stderr.splitlines()[-1] == (
        "llmdist: error: LLMDIST_LOG_LEVEL must be one of "
        "DEBUG, INFO, WARNING, ERROR, CRITICAL or a number, "
        "got 'loud'"
    )


def test_mooncake_log_level_is_warning_unless_set():
    code = "import os, llmdist; print(os.environ['MC_LOG_LEVEL'])"
    assert probe(code, {}).stdout.strip() == "WARNING"
    assert probe(code, {"MC_LOG_LEVEL": "INFO"}).stdout.strip() == "INFO"


def test_verbose_flag_sets_the_level(monkeypatch, capsys, cli_logging):
    logger = cli_logging
    monkeypatch.delenv("LLMDIST_RUNTIME", raising=False)
    assert cli.main(["-v", "info", "--json"]) == 0
    assert logger.level == logging.INFO
    assert cli.main(["info", "-vv", "--json"]) == 0
    assert logger.level == logging.DEBUG
    logging.getLogger("llmdist.cluster").debug("probe line")
    assert "llmdist.cluster DEBUG: probe line" in capsys.readouterr().err
