"""`python -m multicrafter.eval table`: rows from real `eval toy --json` files, seed-std differences, clear errors."""

import json

import pytest

from multicrafter.errors import UserError
from multicrafter.eval.ablation_table import load_result, load_results, main, paired_differences, spread_units, table
from multicrafter.eval.toyworld_scores import main as eval_toy_main


@pytest.fixture(scope="module")
def gt_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("gt") / "gt.json"
    assert eval_toy_main(["--model", "ground-truth", "--n", "3", "--seeds", "0,1", "--json", str(out)]) == 0
    return out


def test_table_rows_from_eval_json(gt_json, tmp_path, capsys):
    res = json.loads(gt_json.read_text())
    worse = dict(res, adapter="worse", id_sim=res["id_sim"] - 0.1, std=dict(res["std"], id_sim=0.02))
    (tmp_path / "worse.json").write_text(json.dumps(worse))
    assert main([str(gt_json), str(tmp_path / "worse.json"), "--against", "no adapter"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| no adapter ", "| worse "))]
    assert len(rows) == 3  # two table rows + one difference row
    assert f"{res['id_sim']:.3f} ± {res['std']['id_sim']:.3f}" in rows[0] and "3 x 2" in rows[0]
    assert rows[2].split("|")[2].strip() == "-5.0"  # -0.1 / max(0.02, gt's std)


def test_spread_units():
    a = {"m": 0.5, "std": {"m": 0.01}}
    b = {"m": 0.47, "std": {"m": 0.02}}
    assert spread_units(b, a, "m") == pytest.approx(-1.5)
    assert spread_units(a, a, "m") == 0.0


def test_bad_inputs_are_one_line_errors(gt_json, tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(UserError, match="not an `eval toy --json` result"):
        load_result(tmp_path / "x.json")
    with pytest.raises(UserError, match="cannot read"):
        load_result(tmp_path / "missing.json")
    with pytest.raises(UserError, match="no row of that name"):
        table([load_result(gt_json)], against="nope")


def test_rows_file_partial_rows_and_tradeoff_plot(gt_json, tmp_path, capsys):
    """A `{"rows": [...]}` file holds several rows; metrics a row lacks print as "-"; the plot draws every row."""
    res = json.loads(gt_json.read_text())
    partial = {"name": "partial", "id_sim": 0.4, "leakage": 0.2, "std": {"id_sim": 0.01, "leakage": 0.02},
               "seeds": [0, 1], "n_scenes": 50}
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps({"rows": [res, partial]}))
    plot = tmp_path / "tradeoff.png"
    assert main([str(rows), "--against", "no adapter", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("| partial | 50 x 2 |"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[2:5] == ["0.400 ± 0.010", "0.200 ± 0.020", "-"]
    diff = [x for x in out.splitlines() if x.startswith("| partial |")][-1]
    assert [c.strip() for c in diff.split("|")[2:5]] == [f"{(0.4 - res['id_sim']) / 0.01:+.1f}",
                                                        f"{(0.2 - res['leakage']) / 0.02:+.1f}", "-"]
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(plot).convert("RGB")).astype(int)
    assert img.shape[0] > 300 and img.shape[1] > 500
    # the cross-hairs and points are drawn: some pixels are neither white nor grey
    assert (np.ptp(img, axis=2) > 60).sum() > 50


def test_rows_file_errors(tmp_path):
    (tmp_path / "empty.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(UserError, match="has no rows"):
        load_results(tmp_path / "empty.json")
    (tmp_path / "bad.json").write_text(json.dumps({"rows": [{"id_sim": 0.4}]}))
    with pytest.raises(UserError, match="row 0 is not an `eval toy --json` result"):
        load_results(tmp_path / "bad.json")
    two = {"id_sim": 0.4, "leakage": 0.1, "std": {}, "seeds": [0], "n_scenes": 1}
    (tmp_path / "two.json").write_text(json.dumps({"rows": [two, two]}))
    with pytest.raises(UserError, match="holds 2 rows, not one"):
        load_result(tmp_path / "two.json")


def test_paired_differences_per_seed(gt_json, tmp_path, capsys):
    """Per-seed gaps only between rows scored on the same scenes and seeds; printed in the --against table."""
    res = json.loads(gt_json.read_text())
    assert len(res["per_seed"]["id_sim"]) == 2
    shifted = dict(res, adapter="shifted",
                   per_seed=dict(res["per_seed"], id_sim=[v - d for v, d in zip(res["per_seed"]["id_sim"], (0.01, 0.03))]))
    assert paired_differences(shifted, res, "id_sim") == pytest.approx([-0.01, -0.03])
    assert paired_differences(dict(shifted, prompts="positions" if res.get("prompts") != "positions" else "full"),
                              res, "id_sim") is None
    assert paired_differences(dict(shifted, seeds=[0, 2]), res, "id_sim") is None
    (tmp_path / "shifted.json").write_text(json.dumps(shifted))
    assert main([str(gt_json), str(tmp_path / "shifted.json"), "--against", "no adapter"]) == 0
    diff = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| shifted |")][-1]
    assert [c.strip() for c in diff.split("|")[-4:-1]] == ["-0.010 / -0.030", "+0.000 / +0.000", "+0.000 / +0.000"]


def test_eval_toy_reports_the_decoy_leakage_per_seed(gt_json):
    res = json.loads(gt_json.read_text())
    for key in ("leakage_real", "leakage_decoy"):
        assert len(res["per_seed"][key]) == 2 and res["std"][key] == 0.0  # renders: the same for every seed
        assert 0.0 <= res[key] <= 0.05


def test_eval_toy_reports_ippo_composite_reward_per_seed(gt_json, tmp_path):
    """`reward` = IPPO's weighted sum of layout (text), quality (aes) and ID-Sim (id), per seed, with the weights of
    train/configs/toy_ippo.yaml unless --reward-weights says otherwise."""
    import yaml

    from multicrafter.eval.toyworld_scores import TOY_REWARD_WEIGHTS

    shipped = yaml.safe_load(open("train/configs/toy_ippo.yaml"))["reward"]["weights"]
    assert {k: float(v) for k, v in shipped.items()} == TOY_REWARD_WEIGHTS
    res = json.loads(gt_json.read_text())
    for i in range(2):
        want = res["per_seed"]["layout"][i] + 0.5 * res["per_seed"]["quality"][i] + res["per_seed"]["id_sim"][i]
        assert res["per_seed"]["reward"][i] == pytest.approx(want)
    out = tmp_path / "id_only.json"
    assert eval_toy_main(["--model", "ground-truth", "--n", "2", "--reward-weights", "id=2", "--json", str(out)]) == 0
    only = json.loads(out.read_text())
    assert only["reward"] == pytest.approx(2 * only["id_sim"]) and only["reward_weights"] == {"id": 2.0}
    for bad in ("id=x", "style=1", "text=0", "id"):
        with pytest.raises(UserError, match="--reward-weights"):
            eval_toy_main(["--model", "ground-truth", "--n", "1", "--reward-weights", bad])
