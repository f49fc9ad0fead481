"""Every benchmark's ``--smoke`` run, in-process, on the session's digits run.

Benchmarks, not timed tests: these check that each runs and writes JSON, a PNG and its
RESULTS.md section with figures that make sense (recalls in [0, 1], positive times, counts
that match the inputs). No assertion is made on a time.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gallery_builder.gallery.build import BuildSettings, build
from query_sdk.spec import InputSpec

GALLERY_MODELS = ("resnet", "widecnn", "vit", "query")  # "query": the query model's own member


def run_smoke(command, tmp_path, *args) -> dict:
    """Run a benchmark's click command with --smoke into tmp_path; return its JSON."""
    out = tmp_path / "out"
    result = CliRunner().invoke(
        command,
        ["--smoke", "--out", str(out), "--results", str(tmp_path / "RESULTS.md"), *map(str, args)],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    name = command.callback.__module__.rsplit(".", 1)[-1]
    data = json.loads((out / f"{name}.json").read_text())
    assert (out / f"{name}.png").stat().st_size > 1000
    text = (tmp_path / "RESULTS.md").read_text()
    assert f"<!-- begin {name} -->" in text and f"<!-- end {name} -->" in text
    assert "Load average" in text and data["machine"]["cores"] >= 1
    assert data["smoke"] is True
    return data


def positive_times(stats: dict) -> bool:
    return 0 < stats["p50_ms"] <= stats["p90_ms"] and stats["n"] > 0


@pytest.fixture(scope="module")
def digits_gallery(digits_run, tmp_path_factory):
    _, _, run_dir = digits_run
    out = tmp_path_factory.mktemp("bench") / "gallery"
    build(
        [run_dir / "models" / n for n in GALLERY_MODELS],
        run_dir / "heads" / "unified",
        "digits",
        out,
        BuildSettings(shard_size=600),
    )
    return run_dir, out


def test_search_smoke(digits_gallery, tmp_path):
    from benchmarks.search import main

    run_dir, gallery = digits_gallery
    data = run_smoke(
        main,
        tmp_path,
        "--cache",
        tmp_path / "cache",
        "--gallery",
        gallery,
        "--query-model",
        run_dir / "models" / "query",
        "--query-heads",
        run_dir / "heads" / "unified",
        "--query-images",
        "digits",
    )
    synthetic, real = data["points"]
    assert synthetic["items"] == 2000 and real["items"] == 1797 and real["dim"] == 32
    for point in data["points"]:
        names = [e["engine"] for e in point["engines"]]
        assert names[:2] == ["hnswlib", "faiss"]
        for engine in point["engines"]:
            recalls = [p["recall_at_10"] for p in engine["curve"]]
            assert all(0.0 <= r <= 1.0 for r in recalls)
            assert recalls[-1] >= 0.9  # ef=128 on 2,000 items is nearly exact
            assert all(positive_times(p) for p in engine["curve"])
            assert engine["bytes_per_item"] > point["dim"] * 4  # vectors + links
            assert 0.0 <= engine["batch"]["recall_at_10"] <= 1.0
        assert positive_times(point["exact"]["single"])
        assert point["exact"]["bytes_per_item"] == point["dim"] * 4
    assert real["engines"][2]["engine"] == "hnswlib, 3 shards (SDK merge)"
    # the cached indexes are reused: same file, same build time, no rebuild
    again = run_smoke(main, tmp_path, "--cache", tmp_path / "cache")
    assert (
        again["points"][0]["engines"][0]["build_seconds"]
        == synthetic["engines"][0]["build_seconds"]
    )


def test_build_smoke(digits_run, tmp_path):
    from benchmarks.build import main

    _, _, run_dir = digits_run
    data = run_smoke(
        main,
        tmp_path,
        "--run",
        run_dir,
        "--images",
        "digits",
        "--engines",
        "local",
        "--large",
        "--work",
        tmp_path / "work",
    )
    assert [p["models"] for p in data["points"]] == [1, 2]
    assert data["points"][1]["model_names"] == ["resnet", "widecnn"]
    for point in data["points"]:
        assert point["engine"] == "local" and point["items"] == 300
        assert point["images_per_second"] > 0 and point["seconds"] > 0
        assert point["reproject"]["seconds"] > 0 and point["reproject"]["speedup"] > 0
    assert data["ray_start_seconds"] is None
    large = data["large"]  # one 224x224 RGB model of a backbone's cost: 2.4 G multiply-adds
    assert large["items"] == 20 and large["input"] == "224x224x3"
    assert 2.3e3 <= large["mflops"] / 2 <= 2.5e3 and large["reproject"]["speedup"] > 0


def test_mobilenet_v3_small_matches_the_published_architecture():
    from gallery_builder.models import count_params, create_model, mflops
    from gallery_builder.models.mobilenet_v3 import IMAGENET_SPEC, PUBLISHED_PARAMS

    model = create_model("mobilenet_v3_small", IMAGENET_SPEC, None)
    assert count_params(model) == PUBLISHED_PARAMS
    assert 55 <= mflops(model, IMAGENET_SPEC) / 2 <= 60  # multiply-adds, published ~56-60 M
    with pytest.raises(ValueError, match="RGB"):
        create_model("mobilenet_v3_small", InputSpec(224, 224, 1), None)


@pytest.fixture(scope="module")
def digits_bundle(digits_gallery):
    """An ONNX fp32 + int8 query bundle of the digits query model (the export package)."""
    from benchmarks.latency import export_query_bundle

    run_dir, gallery = digits_gallery
    bundle = export_query_bundle(
        run_dir / "models" / "query",
        run_dir / "heads" / "unified",
        "digits",
        gallery.parent / "bundle",
        smoke=True,
        jobs=[("onnx", "fp32"), ("onnx", "int8")],
    )
    return run_dir, gallery, bundle


def test_latency_smoke(digits_bundle, tmp_path):
    from benchmarks.latency import main

    run_dir, _, bundle = digits_bundle
    data = run_smoke(
        main,
        tmp_path,
        "--query-model",
        run_dir / "models" / "query",
        "--query-heads",
        run_dir / "heads" / "unified",
        "--calibration",
        "digits",
        "--bundle",
        bundle,
        "--no-mobilenet",
    )
    (model,) = data["models"]
    assert model["input"] == [1, 8, 8, 1] and model["params"] > 0 and model["mflops"] > 0
    rows = {(r["runtime"], r["quantization"]): r for r in model["rows"]}
    assert set(rows) == {("torch eager", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")}
    assert rows[("torch eager", "fp32")]["speedup_1"] == 1.0
    for row in rows.values():
        for t in (1, 2):
            assert positive_times(row[f"threads_{t}"]) and row[f"speedup_{t}"] > 0
    assert rows[("onnxruntime", "int8")]["bytes"] < rows[("onnxruntime", "fp32")]["bytes"]


def test_end_to_end_smoke(digits_bundle, tmp_path):
    from benchmarks.end_to_end import STAGES, main

    _, gallery, bundle = digits_bundle
    data = run_smoke(
        main,
        tmp_path,
        "--bundle",
        bundle,
        "--gallery",
        gallery,
        "--gallery",
        gallery,
        "--images",
        "digits",
    )
    assert data["queries"] == 30 and data["threads"] == 1 and len(data["galleries"]) == 2
    for g in data["galleries"]:
        assert g["items"] == 1797 and g["path"] == str(gallery)
        assert [(v["backend"], v["quantization"]) for v in g["variants"]] == [
            ("onnxruntime", "fp32"),
            ("onnxruntime", "int8"),
        ]
        for v in g["variants"]:
            for stage in (*STAGES, "total"):
                assert positive_times(v["stages"][stage]) and v["stages"][stage]["n"] == 30


def test_accuracy_smoke(digits_bundle, tmp_path):
    from benchmarks.accuracy import main

    run_dir, gallery, bundle = digits_bundle
    data = run_smoke(
        main,
        tmp_path,
        "--report",
        run_dir / "report.json",
        "--bundle",
        bundle,
        "--gallery",
        gallery,
        "--images",
        "digits",
        "--query-model",
        run_dir / "models" / "query",
        "--query-heads",
        run_dir / "heads" / "unified",
    )
    assert data["queries"] == 200 and data["report_settings"]
    fp32 = next(v for v in data["variants"] if v["quantization"] == "fp32")
    # the ONNX fp32 artifact is the torch graph: same vectors, same top-1 hits
    assert abs(fp32["recall_at_1"] - data["torch_fp32_recall_at_1"]) <= 0.01
    for v in data["variants"]:
        assert 0.1 < v["recall_at_1"] <= 1.0  # far above chance (10 classes)
    assert "| **unified:ensemble** |" in (tmp_path / "RESULTS.md").read_text()
