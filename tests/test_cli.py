"""One way to be a command-line tool: the five entry points share cli_args.build_parser and cli_args.run_main
(one-line errors, exit codes, --debug), and the resume guard of the tools that resume (runs.check_resume_settings)."""

import json

import pytest
import torch

import train_erase
from salun_diffusers import cli_args
from salun_diffusers.attacks import cli as attack_cli
from salun_diffusers.classification import cli as classifier_cli
from salun_diffusers.evaluation import cli as audit_cli
from salun_diffusers.runs import SETTINGS_FILE, check_resume_settings


def _entry_points(tmp_path):
    """(prog, main, argv with one bad value, a word of the expected message) for each entry point."""
    out = str(tmp_path / "out")
    return [
        ("train_erase.py", train_erase.main, ["--alpha", "nan", "--output_dir", out], "--alpha"),
        ("salun-audit", audit_cli.main, ["--judge", "digit", "--threshold", "2", "--output_dir", out], "--threshold"),
        ("salun-attack", attack_cli.main, ["--model", "m", "--digit", "12", "--output_dir", out], "--digit"),
        ("salun-classifier", classifier_cli.main, ["--log_level", "LOUD", "--output_dir", out], "--log_level"),
        ("salun-probe", attack_cli.probe_main, ["--digit", "12", "--output_dir", out], "--digit"),
    ]


@pytest.mark.parametrize("index", range(5))
def test_every_entry_point_bad_value_one_line_exit_2_and_debug_traceback(index, tmp_path, capsys):
    prog, main, argv, word = _entry_points(tmp_path)[index]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"{prog}: error: ") and word in err and err.endswith("(--debug shows the traceback)")
    assert "Traceback" not in err
    with pytest.raises(ValueError, match=word):  # --debug: the exception itself, so Python prints its traceback
        main(argv + ["--debug"])


@pytest.mark.parametrize("index", range(5))
def test_every_entry_point_flag_errors_are_one_line_naming_help(index, tmp_path, capsys):
    prog, main, argv, _ = _entry_points(tmp_path)[index]
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--no_such_flag"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"{prog}: error: unrecognized arguments: --no_such_flag (--help lists the flags)"


def test_run_main_exit_codes_and_messages(capsys):
    def raising(exc):
        def fn():
            raise exc
        return fn

    assert cli_args.run_main("tool", lambda: 0) == 0
    assert cli_args.run_main("tool", raising(FileNotFoundError("no file\n  'x'"))) == 2
    assert capsys.readouterr().err == "tool: error: no file 'x' (--debug shows the traceback)\n"
    assert cli_args.run_main("tool", raising(FloatingPointError("diverged at step 3"))) == 2
    assert capsys.readouterr().err == "tool: error: diverged at step 3 (--debug shows the traceback)\n"
    oom = cli_args.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore text")
    assert cli_args.run_main("tool", raising(oom), oom_advice="Lower --batch_size.") == 1
    assert capsys.readouterr().err == ("tool: error: CUDA out of memory. Tried to allocate 2.00 GiB Lower "
                                       "--batch_size. (--debug shows the traceback)\n")
    assert cli_args.run_main("tool", raising(KeyboardInterrupt()), resume_hint="rerun to resume") == 130
    assert capsys.readouterr().err == "tool: interrupted; rerun to resume\n"
    with pytest.raises(RuntimeError):  # a bug: its traceback
        cli_args.run_main("tool", raising(RuntimeError("bug")))
    for exc in (ValueError("v"), FloatingPointError("f"), oom):
        with pytest.raises(type(exc)):
            cli_args.run_main("tool", raising(exc), debug=True)
    assert capsys.readouterr().err == ""
    assert cli_args.run_main("tool", raising(KeyboardInterrupt()), debug=True) == 130  # not an error
    assert capsys.readouterr().err == "tool: interrupted\n"


@pytest.mark.parametrize("error", [FloatingPointError("diverged"), ValueError("bad flag"), RuntimeError("bug")])
def test_run_main_leaves_an_open_process_group(error, tmp_path, capsys):
    """A tool ending in an error inside a multi-process run leaves its torch.distributed group before the process
    exits (a gloo process exiting with its group open aborted now and then: SIGABRT after its one-line error). Here a
    one-process gloo group, opened by the failing work itself, is closed by run_main, also when the error is a bug."""
    import torch.distributed as dist

    def fn():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        raise error

    try:
        if isinstance(error, RuntimeError):
            with pytest.raises(RuntimeError):
                cli_args.run_main("tool", fn)
        else:
            assert cli_args.run_main("tool", fn) == 2
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert cli_args.run_main("tool", lambda: 0) == 0  # no group: nothing to leave


def test_train_erase_interrupt_names_the_resume_flag(monkeypatch, tmp_path, capsys):
    import salun_diffusers.erase as erase_module

    def interrupted(config, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(erase_module, "erase", interrupted)
    assert train_erase.main(["--output_dir", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip() == ("train_erase.py: interrupted; continue with --resume_from_checkpoint "
                                               "latest")


def test_boolean_flags_take_every_spelling(capsys):
    from dataclasses import dataclass

    @dataclass
    class Config:
        check: bool = cli_args.flag_field(True, "a flag on by default")
        extra: bool = cli_args.flag_field(False, "a flag off by default")

    parser = cli_args.build_parser("tool", None, Config)
    parse = lambda *argv: vars(parser.parse_args(list(argv)))  # noqa: E731
    assert parse() == {"check": True, "extra": False, "debug": False}
    for argv, check in ((["--no_check"], False), (["--no-check"], False), (["--check", "false"], False),
                        (["--check"], True), (["--check", "yes"], True)):
        assert parse(*argv)["check"] is check, argv
    assert parse("--extra")["extra"] is True and parse("--extra", "0")["extra"] is False
    with pytest.raises(SystemExit):
        parse("--check", "maybe")
    assert capsys.readouterr().err == ("tool: error: argument --check/--no_check/--no-check: expected true or false, "
                                       "got 'maybe' (--help lists the flags)\n")


def test_audit_keeps_the_dash_spellings_of_its_flags(tmp_path):
    args = audit_cli.parse_args(["--output-dir", str(tmp_path), "--no-erasure-check-base", "--skip-empty-prompts",
                                 "--judge", "digit", "--erasure_scale", "0.5"])
    assert args.output_dir == str(tmp_path) and args.erasure_check_base is False and args.skip_empty_prompts is True
    assert args.erasure_scale == 0.5 and args.debug is False
    assert audit_cli.parse_args(["--output_dir", "o", "--no_erasure_check_base", "--debug"]).erasure_check_base is False


def test_required_fields_are_required_flags(capsys):
    from dataclasses import dataclass, field

    @dataclass
    class Config:
        output_dir: str = field(metadata={"help": "where"})

    parser = cli_args.build_parser("tool", None, Config)
    assert parser.parse_args(["--output_dir", "o"]).output_dir == "o"
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert "the following arguments are required: --output_dir" in capsys.readouterr().err


def test_resume_guard_records_then_refuses_other_settings(tmp_path):
    out = str(tmp_path)
    check_resume_settings(out, {"steps": 3, "seed": 0}, write=False)
    assert not (tmp_path / SETTINGS_FILE).exists()  # only the writing (main) process records them
    check_resume_settings(out, {"steps": 3, "seed": 0})
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == {"steps": 3, "seed": 0}
    check_resume_settings(out, {"seed": 0, "steps": 3})  # the same settings: resumes
    with pytest.raises(ValueError, match=r"holds images drawn with other settings \(seed, steps differ\); use a new "
                                         r"--output_dir \(kept as they are\)"):
        check_resume_settings(out, {"steps": 4, "seed": 1}, holds="images drawn", kept="kept as they are")
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == {"steps": 3, "seed": 0}


def test_oom_error_type_is_torch_s():
    assert issubclass(cli_args.OutOfMemoryError, RuntimeError)
    assert cli_args.OutOfMemoryError is getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
