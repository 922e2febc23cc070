"""What `convert` must never do to the user's files (outdir.py, checkpoint.py): delete the source through --out,
let two writers replace each other's output, leave full-size leftovers after a kill, load a damaged file silently,
or answer the OS's refusals with a traceback. Real HF classes saved with save_pretrained, real processes killed."""
import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_checkpoint import corpus, nothing_written, saved  # noqa: F401  (corpus is a fixture)

import moecompile
from moecompile import MoECompileError
from moecompile.cli import main

FAST = ["--seq-len", "64", "--batches", "2"]


def convert_args(src, out, corpus, *extra):
    return ["convert", str(src), "--routing", "relu", "--calibration", str(corpus), "--out", str(out), *FAST, *extra]


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- refused targets


def test_out_that_contains_the_source_is_refused(tmp_path, corpus, capsys, quiet):
    _, src = saved(tmp_path / "models", "mixtral")
    before = tree(src)
    for out in (src.parent, tmp_path, src):
        assert main(convert_args(src, out, corpus, "--overwrite")) == 2
        err = capsys.readouterr().err
        assert "contains the source directory" in err or "is the source directory" in err, err
    assert tree(src) == before


def test_out_that_is_the_current_directory_or_its_parent_is_refused(tmp_path, corpus, capsys, monkeypatch, quiet):
    _, src = saved(tmp_path, "mixtral")
    work = tmp_path / "project" / "run"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", "..", str(tmp_path / "project")):
        assert main(convert_args(src, out, corpus, "--overwrite")) == 2
        assert "the current directory or one of its parents" in capsys.readouterr().err
    assert (work / "notes.txt").read_text() == "mine"


def test_dangling_symlink_out_is_refused(tmp_path, corpus, capsys, quiet):
    _, src = saved(tmp_path, "mixtral")
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    assert main(convert_args(src, out, corpus)) == 2
    err = capsys.readouterr().err
    assert "is a symlink to" in err and "does not exist" in err and "Traceback" not in err
    assert out.is_symlink() and not (tmp_path / "nowhere").exists()


# ---------------------------------------------------------------------------------------------- concurrent writers


def test_output_that_appears_while_converting_is_not_replaced(tmp_path, corpus, monkeypatch, quiet):
    """Another program writes --out between convert's start and its final move: convert fails and keeps it."""
    from moecompile import checkpoint

    _, src = saved(tmp_path, "mixtral")
    out = tmp_path / "out"
    real_check = checkpoint._check_reload

    def other_writer(*args, **kwargs):
        out.mkdir()
        (out / "theirs.txt").write_text("the other run's output")
        return real_check(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "_check_reload", other_writer)
    with pytest.raises(MoECompileError, match="appeared while this run was writing"):
        moecompile.convert(src, out, "relu", calibration=corpus, seq_len=64, batches=2, progress=False)
    assert tree(out) == {"theirs.txt": b"the other run's output"}
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name or p.name.endswith(".lock")]


def test_second_writer_of_the_same_output_fails_while_the_first_holds_it(tmp_path, corpus, capsys, quiet):
    _, src = saved(tmp_path, "mixtral")
    out = tmp_path / "out"
    from moecompile import outdir

    with outdir.exclusive(out):
        assert main(convert_args(src, out, corpus)) == 2
    assert f"another moecompile (pid {os.getpid()}) is writing this output" in capsys.readouterr().err
    assert nothing_written(tmp_path, out)
    assert main(convert_args(src, out, corpus)) == 0  # released: the next run goes ahead


def _cli(*args, **popen):
    return subprocess.Popen([sys.executable, "-m", "moecompile.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def test_two_processes_converting_to_one_output(tmp_path, corpus, quiet):
    """Started together: one writes a complete checkpoint, the other fails with a clear error."""
    _, src = saved(tmp_path, "mixtral")
    out = tmp_path / "out"
    runs = [_cli(*convert_args(src, out, corpus)) for _ in range(2)]
    results = [(r.wait(timeout=300), r.stderr.read()) for r in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    err = next(e for code, e in results if code == 2)
    assert "Traceback" not in err and any(m in err for m in ("another moecompile", "already exists",
                                                               "appeared while")), err
    moecompile.from_pretrained(out)  # complete, and its checksums hold


# ---------------------------------------------------------------------------------------------- killed runs


SLOW_CONVERT = textwrap.dedent("""
    import sys, time
    from moecompile import checkpoint
    from moecompile.cli import main
    def slow(*args, **kwargs):
        print("written", flush=True)
        time.sleep(600)
    checkpoint._check_reload = slow
    main(sys.argv[1:])
""")


def test_leftovers_of_a_killed_convert_are_removed_by_the_next(tmp_path, corpus, quiet):
    _, src = saved(tmp_path, "mixtral")
    out = tmp_path / "out"
    script = tmp_path / "slow_convert.py"
    script.write_text(SLOW_CONVERT)
    run = subprocess.Popen([sys.executable, str(script), *convert_args(src, out, corpus)], stdout=subprocess.PIPE,
                           text=True)
    assert run.stdout.readline().strip() == "written"
    run.send_signal(signal.SIGKILL)
    run.wait()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert partial and (partial[0] / "config.json").is_file()  # a full-size leftover of the dead process
    rep = moecompile.convert(src, out, "relu", calibration=corpus, seq_len=64, batches=2, progress=False)
    assert f"removed {partial[0].name}" in rep.message
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    moecompile.from_pretrained(out)


def test_output_moved_aside_by_a_killed_overwrite_is_restored(tmp_path, corpus, quiet):
    """Where the one-step exchange is missing, --overwrite renames the old output aside first; a kill between the
    two renames leaves it at .out.old-PID, and the next run puts it back (it is not replaced without --overwrite)."""
    _, src = saved(tmp_path, "mixtral")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    aside = tmp_path / f".out.old-{dead}"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    out = tmp_path / "out"
    with pytest.raises(MoECompileError, match=f"restored {out} from {aside.name}, left by an --overwrite that was "
                                              "killed between its two renames; .* already exists"):
        moecompile.convert(src, out, "relu", calibration=corpus, seq_len=64, batches=2, progress=False)
    assert tree(out) == {"config.json": b"{}"} and not aside.exists()


def test_overwrite_without_the_exchange_call_still_replaces(tmp_path, corpus, monkeypatch, quiet):
    _, src = saved(tmp_path, "mixtral")
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    from moecompile import outdir

    monkeypatch.setattr(outdir, "_renameat2", lambda *a: False)
    moecompile.convert(src, out, "relu", calibration=corpus, seq_len=64, batches=2, progress=False, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_output_folders_get_the_umask_permissions(tmp_path, corpus, quiet):
    _, src = saved(tmp_path, "mixtral")
    old = os.umask(0o022)
    try:
        moecompile.convert(src, tmp_path / "out", "relu", calibration=corpus, seq_len=64, batches=2, progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


# ---------------------------------------------------------------------------------------------- damaged files


def test_flipped_byte_in_a_written_tensor_is_an_error_naming_the_file(tmp_path, corpus, quiet):
    _, src = saved(tmp_path, "mixtral")
    out = tmp_path / "out"
    moecompile.convert(src, out, "relu", calibration=corpus, seq_len=64, batches=2, progress=False)
    weights = out / "model-00001-of-00001.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # inside the last tensor's data: safetensors itself cannot tell
    weights.write_bytes(bytes(data))
    with pytest.raises(MoECompileError, match="model-00001-of-00001.safetensors: its SHA-256 differs"):
        moecompile.from_pretrained(out)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weight_in_an_input_checkpoint_is_named(tmp_path, corpus, capsys, value, quiet):
    model = moecompile.hf_zoo.build("mixtral")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[3, 2, 1] = value
    model.save_pretrained(tmp_path / "src")
    out = tmp_path / "out"
    assert main(convert_args(tmp_path / "src", out, corpus)) == 2
    assert "model.layers.1.mlp.experts.down_proj holds 1 NaN/Inf values" in capsys.readouterr().err
    assert nothing_written(tmp_path, out)
    with pytest.raises(MoECompileError, match="down_proj holds 1 NaN/Inf"):
        moecompile.from_pretrained(tmp_path / "src")


# ---------------------------------------------------------------------------------------------- OS refusals


@pytest.mark.parametrize("code, message", [(errno.ENOSPC, "no space left on the device"),
                                           (errno.EROFS, "the file system is read-only"),
                                           (errno.EACCES, "permission denied")])
def test_os_errors_while_writing_are_one_line(tmp_path, corpus, capsys, monkeypatch, code, message, quiet):
    from moecompile import checkpoint

    _, src = saved(tmp_path, "mixtral")
    out = tmp_path / "out"

    def failing_write(loaded, model, source_dir, tmp, history):
        (tmp / "partial.bin").write_bytes(b"x" * 100)
        raise OSError(code, os.strerror(code), str(tmp / "model.safetensors"))

    monkeypatch.setattr(checkpoint, "_write", failing_write)
    assert main(convert_args(src, out, corpus)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("moecompile: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert nothing_written(tmp_path, out)


def test_output_folder_that_cannot_be_written_is_refused_first(tmp_path, corpus, capsys, monkeypatch, quiet):
    _, src = saved(tmp_path, "mixtral")
    parent = tmp_path / "readonly"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == parent else real_access(p, mode))
    assert main(convert_args(src, parent / "out", corpus)) == 2  # as root chmod cannot make a folder read-only
    assert f"cannot write into {parent} (read-only or no permission)" in capsys.readouterr().err
