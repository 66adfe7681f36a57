"""The app through gradio_client against an in-process launch on `tiny`: every API name, bad inputs as clear errors
with the app still serving, and a real tiny_pretrain.yaml run streamed, refused twice, stopped with no process left."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from PIL import Image

from demo import AppConfig, build_app, launch_kwargs
from demo.jobs import group_members
from multicrafter.dataset_format import load_samples
from multicrafter.generation_params import read_generation_params
from tests.app_fixtures import STEPS, corrupt_png, random_adapter, scene_image, toy_refs

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    cfg = AppConfig(model="tiny", data_dir=root / "data", runs_dir=root / "runs", output_dir=root / "out",
                    sam2=None)
    demo = build_app("tiny", config=cfg)
    port = _free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
                **launch_kwargs(demo))
    client = gradio_client.Client(f"http://127.0.0.1:{port}", verbose=False)
    refs, masks, prompt = toy_refs(root / "refs")
    yield dict(demo=demo, client=client, root=root, refs=refs, masks=masks, prompt=prompt, cfg=cfg,
               adapter=str(random_adapter(root / "adapter")))
    demo.multicrafter["runner"].stop()
    demo.close()


def _gen_args(refs, prompt="two shapes", **kw):
    args = dict(references=[{"image": handle_file(r), "caption": None} for r in refs], name_1="a", name_2="b",
                name_3="", name_4="", prompt=prompt, seed=1, steps=STEPS, guidance=3.5, height=64, width=64,
                adapter="none", adapter_folder="")
    args.update(kw)
    return args


def _still_serving(client):
    out = client.predict(image=handle_file(_still_serving.img), clicks='{"points": [[48, 48, 1]], "box": null}',
                         kind="object", api_name="/segment")
    assert np.asarray(Image.open(out[1])).max() == 255


def test_generate_with_two_references(app):
    img, download, params, notes = app["client"].predict(**_gen_args(app["refs"], app["prompt"]),
                                                         api_name="/generate")
    assert Image.open(img).size == (64, 64)
    meta = read_generation_params(download)
    assert meta["prompt"] == app["prompt"] and meta["seed"] == 1 and len(meta["subjects"]) == 2
    assert params["num_inference_steps"] == STEPS and "Saved" in notes


def test_generate_new_inputs_come_last_with_defaults(app):
    """Reference long side, negative prompt, true CFG and randomize seed are optional trailing inputs: a call made
    the old way (positional, 17 inputs) still works, and the new ones act when given."""
    client = app["client"]
    info = client.view_api(return_format="dict", print_info=False)
    params = info["named_endpoints"]["/generate"]["parameters"]
    new = ["reference_long_side", "negative_prompt", "true_cfg", "randomize_seed"]
    assert [p["parameter_name"] for p in params][-4:] == new
    assert all(p["parameter_has_default"] for p in params[-4:])
    a = _gen_args(app["refs"])
    old_style = [a["references"], "a", "b", "", "", "object", "object", "object", "object", a["prompt"], 1, STEPS,
                 3.5, 64, 64, "none", ""]
    _, download, p_old, _ = client.predict(*old_style, api_name="/generate")
    assert p_old["seed"] == 1 and p_old["true_cfg_scale"] == 1.0 and "negative_prompt" not in p_old
    _, download, p_new, notes = client.predict(**_gen_args(app["refs"], reference_long_side=32,
                                                           negative_prompt="blurry", true_cfg=2.0,
                                                           randomize_seed=True), api_name="/generate")
    meta = read_generation_params(download)
    assert meta == p_new and meta["reference_long_side"] == 32 and p_old["reference_long_side"] == 48
    assert meta["negative_prompt"] == "blurry" and meta["true_cfg_scale"] == 2.0
    assert f"Seed **{meta['seed']}** (drawn at random)" in notes


def test_attention_maps_and_adapter_off(app):
    args = _gen_args(app["refs"], adapter="folder...", adapter_folder=app["adapter"])
    on, off, table, summary, block, step, notes = app["client"].predict(
        **args, masks=[handle_file(m) for m in app["masks"]], compare=True, api_name="/attention")
    assert Image.open(on).size[0] > 64 and off is not None
    assert np.asarray(summary["with_adapter"]["maps"]).shape == (2, 4, 4)
    assert summary["region_source"] == "mask" and set(summary["adapter_off"]["bleeding"]) == {"a", "b"}
    assert [row[0] for row in table["data"]] == ["a", "b"]


def test_segment_click_and_save_sample_round_trip(app, tmp_path):
    img = scene_image(tmp_path / "scene.png")
    _still_serving.img = img
    editor, mask, crop, status = app["client"].predict(
        image=handle_file(img), clicks='{"points": [[48, 48, 1]], "box": null}', kind="object", api_name="/segment")
    m = np.asarray(Image.open(mask).convert("L")) > 127
    assert 0.15 < m.mean() < 0.4 and "GrabCut" in status and crop is not None and editor["background"]
    out = app["client"].predict(dataset="mine", sample_name="s1", image=handle_file(img), caption="a red box",
                                subject_name="box", subject_kind="object", mask=handle_file(mask),
                                api_name="/save_sample")
    assert "saved sample **s1**" in out[0]
    samples = load_samples(app["cfg"].data_dir / "mine")
    assert [s.name for s in samples] == ["s1"] and samples[0].caption == "a red box"
    assert np.array_equal(samples[0].subjects[0].load_mask(), m)


@pytest.mark.parametrize("case", ["no references", "five references", "corrupt file", "empty prompt",
                                  "bad dataset name", "missing dataset"])
def test_bad_inputs_are_clear_errors_and_the_app_keeps_serving(app, tmp_path, case):
    client = app["client"]
    expected = {"no references": "add 1 to 4 reference images", "five references": "too many reference images",
                "corrupt file": "not a valid image", "empty prompt": "write a prompt",
                "bad dataset name": "invalid dataset name", "missing dataset": "no dataset named"}[case]
    with pytest.raises(AppError) as err:
        if case == "no references":
            client.predict(**_gen_args([]), api_name="/generate")
        elif case == "five references":
            client.predict(**_gen_args(app["refs"] * 2 + app["refs"][:1]), api_name="/generate")
        elif case == "corrupt file":
            client.predict(**_gen_args([corrupt_png(tmp_path / "bad.png")]), api_name="/generate")
        elif case == "empty prompt":
            client.predict(**_gen_args(app["refs"], prompt="  "), api_name="/generate")
        elif case == "bad dataset name":
            img = scene_image(tmp_path / "s.png")
            mask = Image.fromarray(np.full((96, 96), 255, np.uint8))
            mask.save(tmp_path / "m.png")
            client.predict(dataset="../escape", sample_name="", image=handle_file(img), caption="c",
                           subject_name="x", subject_kind="object", mask=handle_file(str(tmp_path / "m.png")),
                           api_name="/save_sample")
        else:
            client.predict(mode="pretrain", config="tiny_pretrain.yaml", config_text="", max_steps=1,
                           dataset="nowhere", run_name="", lr=None, attention_weight=None, api_name="/train_start")
    assert expected in str(err.value) and "Traceback" not in str(err.value)
    assert not (app["root"] / "escape").exists()
    if not hasattr(_still_serving, "img"):
        _still_serving.img = scene_image(tmp_path / "alive.png")
    _still_serving(client)


def test_huge_reference_is_downscaled_with_a_note(app, tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (8000, 8000), (30, 120, 200)).save(big, compress_level=1)
    _, download, _, notes = app["client"].predict(**_gen_args([str(big)]), api_name="/generate")
    assert "8000x8000" in notes and "downscaled" in notes and Image.open(download).size == (64, 64)


@pytest.mark.slow
def test_train_start_streams_refuses_a_second_job_and_stop_leaves_nothing(app):
    client, runner = app["client"], app["demo"].multicrafter["runner"]
    job = client.submit(mode="pretrain", config="tiny_pretrain.yaml", config_text="", max_steps=100000, dataset="",
                        run_name="client-run", lr=None, attention_weight=None, api_name="/train_start")
    deadline, log = time.time() + 150, ""
    while time.time() < deadline:
        outs = job.outputs()
        log = outs[-1][0] if outs else ""
        if "pretrain:" in log:
            break
        time.sleep(0.5)
    assert "pretrain:" in log, f"no training progress streamed; last log: {log[-500:]!r}"
    pid = runner.job.pid
    assert group_members(pid)
    with pytest.raises(AppError, match="already running"):
        client.predict(mode="pretrain", config="tiny_pretrain.yaml", config_text="", max_steps=1, dataset="",
                       run_name="second", lr=None, attention_weight=None, api_name="/train_start")
    assert not (app["cfg"].runs_dir / "second").exists()
    status = client.predict(api_name="/train_stop")
    assert "stopped" in status
    job.result(timeout=30)
    assert job.done() and not group_members(pid)
    assert (app["cfg"].runs_dir / "client-run" / "config.yaml").is_file()
    assert (app["cfg"].runs_dir / "client-run" / "log.txt").read_text().strip()
