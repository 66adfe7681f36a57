"""`python -m multicrafter.eval table`: rows from real `eval toy --json` files, seed-std differences, clear errors."""

import json

import pytest

from multicrafter.errors import UserError
from multicrafter.eval.table import load_result, main, spread_units, table
from multicrafter.eval.toy import main as eval_toy_main


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
