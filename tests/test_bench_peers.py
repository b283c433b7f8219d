"""benchmarks/bench_peers.py: the tuning rule that freezes each method's setting, and the report it writes."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_peers", os.path.join(ROOT, "benchmarks", "bench_peers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(method, setting, digit, ua, drop, cond, kind="tune"):
    return {"method": method, "setting": setting, "digit": digit, "kind": kind, "unlearning_accuracy": ua,
            "retained_drop": drop, "retained_accuracy": 0.99 - drop, "conditioning": {"asr": cond},
            "wall_seconds": 1.0, "cpu_seconds": 1.0}


def test_choose_prefers_the_qualifying_setting_with_the_lowest_attack_success(bench):
    a, b, c = {"lr": 1}, {"lr": 2}, {"lr": 3}
    rows = []
    for d in (1, 4, 7):
        rows.append(_row("m", a, d, 1.0, 0.01, 0.30))   # qualifies, attack 30%
        rows.append(_row("m", b, d, 1.0, 0.02, 0.10))   # qualifies, attack 10%: the pick
        rows.append(_row("m", c, d, 1.0, 0.01 if d != 4 else 0.05, 0.0))  # best attack, but 5 points on digit 4
    chosen = bench.choose(rows)["m"]
    assert chosen["setting"] == b and chosen["digits"] == [1, 4, 7]
    assert chosen["why"].startswith("qualifies")


def test_choose_falls_back_to_unlearning_then_damage(bench):
    weak, strong = {"lr": 1}, {"lr": 2}
    rows = [_row("m", weak, d, 0.80, 0.01, 0.5) for d in (1, 4)] + [_row("m", strong, d, 0.90, 0.02, 0.5) for d in (1, 4)]
    assert bench.choose(rows)["m"]["setting"] == strong      # no setting reaches 95%: highest UA at drop <= 3
    rows = [_row("m", weak, d, 1.0, 0.10, 0.5) for d in (1, 4)] + [_row("m", strong, d, 1.0, 0.05, 0.5) for d in (1, 4)]
    assert bench.choose(rows)["m"]["setting"] == strong      # every setting damages: the smallest mean drop


def test_summary_counts_digits_meeting_both_targets(bench):
    rows = [_row("uce", {}, d, ua, drop, cond, kind="report")
            for d, ua, drop, cond in [(0, 1.0, 0.01, 0.9), (1, 0.94, 0.0, 0.8), (2, 1.0, 0.031, 0.7)]]
    (s,) = bench.summarize(rows)
    assert s["both_targets"] == 1 and s["ua_min"] == pytest.approx(0.94) and s["drop_max"] == pytest.approx(0.031)
    assert s["cond_mean"] == pytest.approx(0.8)
    text = bench.markdown({"threads": 1, "jobs": 1, "n_per_digit": 50, "kind": "report", "digits": [0, 1, 2],
                           "rows": rows, "summary": [s]})
    assert "| uce | 3 | 98.0% / 94% | 1.4 / 3.1 | 80% / 90% | — / — | — / — | — / — | 1 of 3 | 1 / 1 |" in text


def test_every_grid_setting_is_a_train_erase_flag_set_that_resolves_to_itself(bench):
    """The bench erases through erase() with train_erase.py's flags: each tuned setting maps onto EraseConfig fields
    whose resolved method config holds exactly the setting's values (a renamed or dropped flag fails here)."""
    from salun_diffusers.config import EraseConfig
    from salun_diffusers.erasure.peers import method_config
    from salun_diffusers.methods import NEXT_DIGIT

    for method, grid in bench.GRID.items():
        if method in bench.SALUN_ROWS:
            continue
        for setting in grid + [bench.FROZEN[method]]:
            flags = bench.peer_flags(method, setting)
            resolved = method_config(EraseConfig(concept="seven", method=method, **flags)).to_dict()
            for key, value in setting.items():
                if key == "guide":
                    assert resolved["guide_prompt"] == (NEXT_DIGIT if value == "next" else value)
                else:
                    assert resolved[key] == value, (method, key)
    with pytest.raises(ValueError, match="has no train_erase.py flag"):
        bench.peer_flags("esd-x", {"momentum": 0.9})


def test_variant_rows_parse_run_by_default_and_sit_before_the_reference(bench, capsys):
    args = bench.parse_args(["--variant", 'robust={"adversarial": true, "alpha": 6}'])
    assert args.variants == {"robust": [{"adversarial": True, "alpha": 6}]}
    assert args.methods[-1] == "robust" and set(bench.METHODS) <= set(args.methods)
    rows = [_row(m, {}, 0, 1.0, 0.0, 0.1, kind="report") for m in ("never learned", "robust", "uce", "base")]
    assert bench.row_order(rows) == ["base", "uce", "robust", "never learned"]
    for bad, message in [('robust={"alpah": 6}', "not EraseConfig fields"), ("robust={alpha", "does not parse"),
                         ('uce={"alpha": 6}', "with a NAME not in")]:
        with pytest.raises(SystemExit):
            bench.parse_args(["--variant", bad])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # several settings of one name are for --tune
        bench.parse_args(["--variant", 'r={"alpha": 4}', "--variant", 'r={"alpha": 6}'])
    assert len(bench.parse_args(["--tune", "--variant", 'r={"alpha": 4}', "--variant", 'r={"alpha": 6}'])
               .variants["r"]) == 2


def test_probes_table_reads_relearning_against_the_never_learned_reference(bench):
    def probed(method, digit, steps, sd=0.2, strong=0.1):
        r = _row(method, {}, digit, 1.0, 0.0, 0.1, kind="report")
        r.update(relearning={"steps": steps, "max_steps": 100, "median": None},
                 sdedit={"0.5": sd, "0.7": sd / 2, "0.9": 0.0}, strong={"asr": strong})
        return r

    rows = [probed("never learned", 2, [80, 80, 70]), probed("never learned", 5, [50, 60, 50]),
            probed("salun", 2, [60, 50, 60]), probed("salun", 5, [None, None, 40]),  # median > 100: held on five
            probed("salun-adv", 2, [100, None, 100], strong=0.3), probed("salun-adv", 5, [40, 50, 40])]
    text = bench.probes_markdown({"rows": rows})
    assert "| salun | 20% / 10% / 0% | 2: 60, 5: >100 | 1 of 2 | 10% / 10% |" in text
    assert "| salun-adv | 20% / 10% / 0% | 2: 100, 5: 40 | 1 of 2 | 20% / 30% |" in text
    assert "| never learned | 20% / 10% / 0% | 2: 80, 5: 50 | — |" in text
    assert bench.probes_markdown({"rows": [_row("uce", {}, 0, 1.0, 0.0, 0.1, kind="report")]}) == ""


def test_a_finished_row_is_completed_with_missing_probes_not_rerun(bench, tmp_path, monkeypatch):
    args = bench.parse_args(["--output_dir", str(tmp_path), "--probes", "sdedit"])
    made, probed = [], []
    monkeypatch.setattr(bench, "make_model", lambda *a: made.append(a) or ("pipe", 1.0, 1.0, {}))
    monkeypatch.setattr(bench, "knowledge_probes", lambda a, pipe, d, name, kinds: probed.append(kinds) or
                        {k: {"0.5": 0.25} for k in kinds})
    row = _row("uce", {}, 3, 1.0, 0.0, 0.1, kind="report")
    (tmp_path / "rows").mkdir()
    bench.write_json(str(tmp_path / "rows" / "report-uce-default-3.json"), row)
    out = bench.run_piece(args, "uce", {}, 3, None, None, None)
    assert probed == [["sdedit"]] and len(made) == 1 and out["sdedit"] == {"0.5": 0.25}
    assert out["unlearning_accuracy"] == 1.0  # the finished part is kept, not recomputed
    assert bench.run_piece(args, "uce", {}, 3, None, None, None) == out and len(made) == 1  # complete: untouched
    with pytest.raises(SystemExit):
        bench.parse_args(["--probes", "sdedit,fid"])


def test_tuning_takes_the_strong_attack_on_the_tuning_images_only(bench, tmp_path, monkeypatch, capsys):
    """--tune --probes strong: the 1,000-step attack on the tuning attack's images and seed (never the report's);
    the other probes stay the report's."""
    with pytest.raises(SystemExit):
        bench.parse_args(["--tune", "--probes", "strong,relearning"])
    assert "--tune takes --probes strong only" in capsys.readouterr().err
    seen = {}
    monkeypatch.setattr(bench, "digit_images", lambda d, n, offset=0: seen.update(n=n, offset=offset) or ["img"])
    monkeypatch.setattr(bench, "conditioning_probe", lambda pipe, judge, images, prompt, steps, seed:
                        seen.update(steps=steps, seed=seed) or {"asr": 0.25, "_images": []})
    monkeypatch.setattr(bench, "make_judge", lambda *a, **k: None)
    for argv, attack in ((["--tune"], bench.ATTACK["tune"]), ([], bench.ATTACK["report"])):
        args = bench.parse_args([*argv, "--output_dir", str(tmp_path), "--probes", "strong"])
        assert bench.knowledge_probes(args, None, 3, "x", ["strong"]) == {"strong": {"asr": 0.25}}
        assert seen == {"n": attack["n"], "offset": attack["offset"], "steps": bench.STRONG_STEPS,
                        "seed": attack["seed"]}
    assert bench.ATTACK["tune"]["offset"] >= bench.ATTACK["report"]["n"]  # disjoint from the report's images
