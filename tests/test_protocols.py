"""Protocol expansion with the paper's defaults, and a base-to-new + cross-dataset sweep end to end."""

import json
import pickle
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from alignednorm.backbone.tiny import make_tiny_clip, save_openai_state_dict
from alignednorm.cli.runs import report_cmd, run_app
from alignednorm.data.catalog import DatasetSpec, Suite, register_dataset, register_suite
from alignednorm.errors import ConfigError
from alignednorm.protocols import expand, list_protocols
from alignednorm.protocols.runner import SweepRequest, target_overrides, variant_name

PAPER_11 = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
            "sun397", "dtd", "eurosat", "ucf101")
TINY = ("proto_a", "proto_b", "proto_c")

for _name in TINY:
    register_dataset(DatasetSpec(_name, _name.title().replace("_", ""), _name, "images",
                                 split_file=f"split_{_name}.json", suites=("protest",)))
register_suite(Suite("protest", base2new=TINY[:2], source="proto_a", cross_targets=("proto_b",),
                     dg_targets=("proto_c",)))


def write_tiny_datasets(root: Path, classes: int = 4, train: int = 3, test: int = 2) -> Path:
    """Split-JSON datasets ``proto_a/b/c`` with real 8x8 images, one colour per class."""
    for d, name in enumerate(TINY):
        split = {"train": [], "val": [], "test": []}
        for label in range(classes):
            cname = f"{name}_class{label}"
            for part, count in (("train", train), ("val", 2), ("test", test)):
                for i in range(count):
                    rel = f"{cname}/{part}{i}.png"
                    shade = (60 * label + 7 * i + 30 * d) % 256
                    path = root / name / "images" / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.new("RGB", (8, 8), (shade, 255 - shade, 40 * label)).save(path)
                    split[part].append([rel, label, cname])
        (root / name / f"split_{name}.json").write_text(json.dumps(split))
    return root


def request(method="alignednorm", **kw) -> SweepRequest:
    return SweepRequest(method, "/data", "/clip.pt", "/out", **kw)


# ----------------------------------------------------------------------------------- expansion
def test_protocol_names():
    assert list_protocols() == ["base2new", "crossdataset", "domaingen", "fewshot"]


def test_base2new_paper_defaults():
    jobs = expand("base2new", request())
    assert len(jobs) == 11 * 3
    assert [j.dataset for j in jobs[::3]] == list(PAPER_11) and [j.seed for j in jobs[:3]] == [1, 2, 3]
    assert {(j.shots, j.train_subset, j.protocol) for j in jobs} == {(16, "base", "base2new")}
    job = jobs[0]
    assert job.train_dir == "/out/base2new/imagenet/shots16/alignednorm/default/seed1"
    (step,) = job.evals
    assert step.target == "imagenet" and step.run_dir == job.train_dir + "/eval/imagenet"
    assert [(e.name, e.classes, e.rule) for e in step.evaluations] == [
        ("base", "base", "seen"), ("new", "new", "unseen")]
    # the per-dataset presets are resolved into each job, the seed included
    assert job.config["train"]["batch_size"] == 32 and job.config["train"]["epochs"] == 5
    sun = next(j for j in jobs if j.dataset == "sun397" and j.seed == 2)
    assert sun.config["train"]["epochs"] == 13 and sun.config["train"]["seed"] == 2
    assert sun.config["method"]["proj_align_weight"] == 0.1
    assert pickle.loads(pickle.dumps(jobs)) == jobs


def test_fewshot_paper_defaults():
    jobs = expand("fewshot", request("mmrlpp"))
    assert len(jobs) == 11 * 5 * 3
    assert sorted({j.shots for j in jobs}) == [1, 2, 4, 8, 16] and {j.train_subset for j in jobs} == {"all"}
    step = jobs[0].evals[0]
    assert [(e.name, e.classes, e.rule) for e in step.evaluations] == [("all", "all", "seen")]
    assert "/fewshot/imagenet/shots1/mmrlpp/default/seed1" in jobs[0].train_dir
    caltech = next(j for j in jobs if j.dataset == "caltech101")
    assert caltech.config["train"]["epochs"] == 100 and caltech.config["train"]["lr"] == 2e-3
    assert jobs[0].config["train"]["epochs"] == 5  # ImageNet


def test_crossdataset_trains_once_per_seed_and_evaluates_every_target():
    jobs = expand("crossdataset", request("mmrlpp"))
    assert len(jobs) == 3 and {(j.dataset, j.train_subset, j.shots) for j in jobs} == {("imagenet", "all", 16)}
    job = jobs[0]
    assert job.config["train"]["epochs"] == 1 and job.config["train"]["warmup_epochs"] == 0
    assert job.config["method"]["prc_beta"] == 0.9 and job.config["method"]["reg_weight"] == 0.1
    source, *targets = job.evals
    assert source.target == "imagenet" and [(e.classes, e.rule) for e in source.evaluations] == [("all", "seen")]
    assert tuple(t.target for t in targets) == PAPER_11[1:]
    assert {(e.classes, e.rule) for t in targets for e in t.evaluations} == {("all", "unseen")}
    betas = {t.target: t.method_overrides.get("prc_beta") for t in job.evals}
    assert betas["imagenet"] is None and betas["caltech101"] == 0.6 and betas["eurosat"] == 0.3
    assert all(Path(s.run_dir).parent == Path(job.train_dir) / "eval" for s in job.evals)


def test_domaingen_reuses_the_crossdataset_training_run():
    cd, dg = expand("crossdataset", request("mmrlpp")), expand("domaingen", request("mmrlpp"))
    assert [j.train_dir for j in dg] == [j.train_dir for j in cd]
    assert dg[0].config == cd[0].config
    assert [s.target for s in dg[0].evals] == ["imagenet", "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    assert {s.target: s.method_overrides for s in dg[0].evals}["imagenet_a"] == {"prc_beta": 0.8}
    # AlignedNorm keeps MMRL++'s settings, its per-target test-time table included.
    assert target_overrides("alignednorm", "domaingen") == target_overrides("mmrlpp", "domaingen")


def test_request_options():
    jobs = expand("base2new", request(datasets=("EuroSAT", "dtd"), seeds=(7,), shots=(4,)))
    assert [(j.dataset, j.seed, j.shots) for j in jobs] == [("eurosat", 7, 4), ("dtd", 7, 4)]
    with pytest.raises(ConfigError, match="unknown dataset"):
        expand("base2new", request(datasets=("imagenett",)))
    with pytest.raises(ConfigError, match="source"):
        expand("crossdataset", request(datasets=("imagenet",)))
    with pytest.raises(ConfigError, match="unknown suite"):
        expand("base2new", request(suite="nope"))
    fixed = expand("base2new", request(datasets=("dtd",), sets=("train.seed=5",)))
    assert {j.config["train"]["seed"] for j in fixed} == {5}


def test_variant_names(tmp_path):
    assert variant_name(None, None, ()) == "default"
    assert variant_name("unified", None, ("method.inference=unified",)) == "unified"
    custom = variant_name(None, None, ("train.epochs=1",))
    assert custom.startswith("custom-") and custom != variant_name(None, None, ("train.epochs=2",))
    # settings that never change a number name no variant: the same runs, the same folders
    assert variant_name(None, None, ("data.num_workers=8", "train.log_every = 5")) == "default"
    assert variant_name(None, None, ("train.epochs=1", "data.num_workers=8")) == custom
    yaml = tmp_path / "c.yaml"
    yaml.write_text("train: {epochs: 3}\n")
    assert variant_name(None, str(yaml), ()).startswith("custom-")
    with pytest.raises(ConfigError, match="--tag"):
        variant_name("a/b", None, ())
    with pytest.raises(ConfigError, match="--config .*nope.yaml: no such file"):
        variant_name(None, str(tmp_path / "nope.yaml"), ())
    job = expand("base2new", request(datasets=("dtd",), seeds=(1,), tag="proj-only"))[0]
    assert job.variant == "proj-only" and "/alignednorm/proj-only/seed1" in job.train_dir


def test_test_time_overrides_change_the_forward_and_are_restored(tiny_backbone):
    import torch

    from alignednorm.methods import create_method

    method = create_method("mmrlpp", tiny_backbone, {"rep_layers": [2, 3]}).eval()
    method.set_classnames(["cat", "dog"])
    with torch.no_grad():
        method.rep_tokens.normal_()
    images = torch.randn(2, 3, 32, 32)
    before = method.predict(images, "any")
    with method.overridden({"prc_beta": 0.1}):  # the cached text features are dropped, not reused
        assert method.prc_beta == 0.1
        during = method.predict(images, "any")
    assert method.prc_beta == 0.9 and not torch.allclose(before, during)
    assert torch.equal(method.predict(images, "any"), before)


# ----------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    return save_openai_state_dict(make_tiny_clip(seed=3, layers=3), tmp_path_factory.mktemp("clip") / "tiny.pt")


def cli_app() -> typer.Typer:
    """The commands as ``alignednorm.cli`` registers them."""
    app = typer.Typer()
    app.add_typer(run_app, name="run")
    app.command("report")(report_cmd)
    return app


def invoke(*args) -> str:
    result = CliRunner().invoke(cli_app(), [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_base2new_and_crossdataset_sweeps_end_to_end(tmp_path, clip_file):
    data, out = write_tiny_datasets(tmp_path / "data"), tmp_path / "runs"
    common = ["--method", "alignednorm", "--suite", "protest", "--data-root", data, "--clip", clip_file,
              "--output", out, "--shots", 2, "--set", "method.rep_layers=[2,3]", "--set", "train.epochs=1",
              "--set", "train.batch_size=4", "--tag", "tiny"]
    printed = invoke("run", "base2new", *common, "--seeds", "1", "2")
    assert "2 of 4 jobs finished" not in printed and "4 of 4 jobs finished" in printed
    assert "Base-to-new: alignednorm-tiny" in printed
    run = out / "base2new" / "proto_a" / "shots2" / "alignednorm" / "tiny" / "seed2"
    assert {"config.yaml", "run.json", "learnable.safetensors", "metrics.json"} <= {p.name for p in run.iterdir()}
    metrics = json.loads((run / "eval" / "proto_a" / "metrics.json").read_text())
    assert (metrics["protocol"], metrics["variant"], metrics["seed"], metrics["suite"]) == ("base2new", "tiny", 2,
                                                                                        "protest")
    assert metrics["eval"]["base"]["num_classes"] == 2 and metrics["eval"]["new"]["rule"] == "unseen"
    assert metrics["eval"]["base"]["num_samples"] == 4

    invoke("run", "crossdataset", *common, "--seeds", "1")
    cd_run = out / "crossdataset" / "proto_a" / "shots2" / "alignednorm" / "tiny" / "seed1"
    source = json.loads((cd_run / "eval" / "proto_a" / "metrics.json").read_text())
    target = json.loads((cd_run / "eval" / "proto_b" / "metrics.json").read_text())
    assert (source["eval"]["all"]["rule"], source["eval"]["all"]["num_classes"]) == ("seen", 4)
    assert (target["eval"]["all"]["rule"], target["eval"]["all"]["num_samples"]) == ("unseen", 8)

    # Domain generalisation evaluates the same prompt: no second training run.
    stamp = (cd_run / "learnable.safetensors").stat().st_mtime_ns
    invoke("run", "domaingen", *common, "--seeds", "1")
    assert (cd_run / "eval" / "proto_c" / "metrics.json").is_file()
    assert (cd_run / "learnable.safetensors").stat().st_mtime_ns == stamp

    # Finished runs are skipped; --force re-runs them.
    eval_file = run / "eval" / "proto_a" / "metrics.json"
    stamp = eval_file.stat().st_mtime_ns
    invoke("run", "base2new", *common, "--seeds", "2", "--datasets", "proto_a")
    assert eval_file.stat().st_mtime_ns == stamp
    invoke("run", "base2new", *common, "--seeds", "2", "--datasets", "proto_a", "--force")
    assert eval_file.stat().st_mtime_ns != stamp

    report = invoke("report", out)
    assert "Base-to-new: alignednorm-tiny (2 shots)" in report
    assert "Cross-dataset: trained on proto_a" in report and "Domain generalisation: trained on proto_a" in report
    line = next(row for row in report.splitlines() if row.startswith("| proto_b |"))
    assert line.count("±") == 2 and line.rstrip(" |").endswith("2")  # base ± std, new ± std, HM; 2 seeds
    # The tables as Markdown, CSV and LaTeX, the results page and its figures' folder.
    assert {p.suffix for p in (out / "report").iterdir() if p.is_file()} == {".md", ".csv", ".tex", ".html"}
    assert (out / "report" / "report.html").is_file() and (out / "report" / "figures").is_dir()


def test_run_command_lists_and_failures(json_dataset, clip_file, tmp_path, caplog):
    out = tmp_path / "runs"
    listed = invoke("run", "fewshot", "--method", "mmrlpp", "--data-root", json_dataset.root, "--clip", clip_file,
                    "--output", out, "--seeds", "1", "2", "--shots", "1", "4", "--datasets", "dtd", "eurosat",
                    "--dry-run")
    names = [line.split(":")[0] for line in listed.splitlines()]
    assert len(names) == 2 * 2 * 2 and names[0] == "fewshot/dtd/shots1/mmrlpp/default/seed1"
    assert names[-1] == "fewshot/eurosat/shots4/mmrlpp/default/seed2"
    result = CliRunner().invoke(cli_app(), [str(a) for a in (
        "run", "base2new", "--method", "zeroshot", "--data-root", json_dataset.root, "--clip", clip_file,
        "--output", out, "--seeds", "1", "--datasets", "oxford_pets,dtd")])
    assert result.exit_code == 1 and "1 of 2 jobs finished" in result.output
    assert "failed: base2new/dtd/shots16/zeroshot/default/seed1" in result.output
    # A user-facing error (here: a missing dataset) is its one line, never with a traceback.
    assert "base2new/dtd/shots16/zeroshot/default/seed1 failed: " in caplog.text and "Traceback" not in caplog.text


@pytest.mark.parametrize("method", ["coop", "nemesis"])
def test_fewshot_epochs_follow_the_official_runs_per_shot_count(method):
    """CoOp / Nemesis: rn50_ep50 for 1 shot, rn50_ep100 for 2 and 4, rn50 (200) for 8 and 16; ImageNet 50."""
    jobs = expand("fewshot", request(method, seeds=(1,), datasets=("caltech101", "imagenet")))
    epochs = {(j.dataset, j.shots): j.config["train"]["epochs"] for j in jobs}
    assert [epochs["caltech101", k] for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert {epochs["imagenet", k] for k in (1, 2, 4, 8, 16)} == {50}
    # --set still wins over the per-shot section.
    fixed = expand("fewshot", request(method, seeds=(1,), datasets=("dtd",), shots=(1,), sets=("train.epochs=3",)))
    assert fixed[0].config["train"]["epochs"] == 3


def test_a_bad_shots_key_is_named(tmp_path, monkeypatch):
    from alignednorm import config as C

    preset = tmp_path / "coop.yaml"
    preset.write_text("protocols:\n  fewshot:\n    shots:\n      one: {train: {epochs: 5}}\n")
    monkeypatch.setattr(C, "preset_path", lambda method: preset)
    with pytest.raises(ConfigError, match="shots key 'one'"):
        C.resolve_config("coop", "fewshot", "dtd", shots=1)
