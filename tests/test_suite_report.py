"""The suite benchmark's bookkeeping: training time read back from the runs, and the tables' verdicts."""
import json
from pathlib import Path

from conftest import load_benchmark as load_script


def write_log(path: Path, seconds: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"epoch": i + 1, "train_loss": 1.0, "seconds": s}) for i, s in enumerate(seconds)]
    path.write_text("\n".join(lines) + "\n\n")  # a stray blank line (a hand edit) is not an epoch


def test_training_seconds_adds_every_grid_point_and_seed_run(tmp_path):
    accuracy = load_script("accuracy")
    folder = tmp_path / "ivpt" / "dtd10"
    write_log(folder / "grid" / "lr0.01_wd0.0001" / "metrics.jsonl", [10.0, 12.0])
    write_log(folder / "grid" / "lr0.03_wd0.0001" / "metrics.jsonl", [11.5])
    write_log(folder / "final" / "seed42" / "metrics.jsonl", [20.0, 20.0, 20.0])
    write_log(tmp_path / "ivpt" / "pneumonia" / "final" / "seed42" / "metrics.jsonl", [99.0])  # another task
    assert accuracy.training_seconds(folder) == 93.5
    assert accuracy.training_seconds(tmp_path / "missing") == 0.0


def task(mean, seeds):
    std = (sum((s - mean) ** 2 for s in seeds) / (len(seeds) - 1)) ** 0.5
    return {"test_mean": mean, "test_std": std, "seeds": seeds, "chosen": {"lr": 0.01, "weight_decay": 1e-4}}


def test_verdict_is_a_tie_within_two_standard_errors():
    report = load_script("report")
    base = task(0.50, [0.49, 0.50, 0.51])
    assert report.verdict(task(0.51, [0.50, 0.51, 0.52]), base).startswith("tie")
    assert report.verdict(task(0.60, [0.59, 0.60, 0.61]), base) == "win (+10.0)"
    assert report.verdict(task(0.40, [0.39, 0.40, 0.41]), base) == "loss (-10.0)"


def test_tables_set_ivpt_against_every_method_and_the_time_spent():
    report = load_script("report")
    def method(mean, hours, tuned):
        return {"tasks": {"dtd10": task(mean, [mean - 0.01, mean, mean + 0.01])},
                "groups": {"natural": mean}, "mean_of_group_means": mean, "plain_mean": mean,
                "tuned_parameters": {"tuned_without_head": tuned}, "training_seconds": {"dtd10": 3600 * hours}}
    data = {"methods": {"vpt-deep": method(0.50, 1.0, 100), "ivpt": method(0.50, 2.0, 110),
                        "ivpt-static": method(0.50, 1.5, 105), "gatevpt": method(0.40, 0.5, 20)}}
    text = report.accuracy_tables(data)
    against = text.split("iVPT against each other method")[1]
    assert "| gatevpt | win (+10.0) |" in against and "| ivpt-static | tie (+0.0) |" in against
    assert "5.0 core-hours in all; vpt-deep 1.00, ivpt 2.00, ivpt-static 1.50, gatevpt 0.50." in text
    # today's names: ivpt is the gate, ivpt-static the static connection; the 5-epoch run's ivpt was static
    new = report.ablation_table(data)
    assert "| ivpt-static | yes | static | yes |" in new and "| ivpt | yes | gate | yes |" in new
    old = report.ablation_table(data, report.SWITCHES_5EPOCH)
    assert "| ivpt | yes | static (then the default) | yes |" in old and "ivpt-static" not in old


def test_family_cost_table_shows_options_short_and_every_ratio_to_vpt_deep():
    report = load_script("report")
    def config(method, options, groups, step, saved):
        return {"method": method, "options": options, "parameter_groups": groups,
                "tuned_without_head": sum(groups.values()), "train_step_s": step, "inference_s": step / 2,
                "train_vs_vpt_deep": step / 4.0, "inference_vs_vpt_deep": step / 4.0,
                "saved_activation_bytes": saved, "saved_vs_vpt_deep": saved / 2 ** 30}
    data = {"machine": "x86_64", "date": "2026-12-06", "command": "python benchmarks/cost.py --family --rounds 10",
            "backbone": "vit_base_patch16_224", "image_size": 224, "batch": 8, "prompt_length": 10, "rounds": 10,
            "configurations": {
                "vpt-deep": config("vpt-deep", {}, {"prompts": 92160}, 4.0, 2 ** 30),
                "e2vpt-pruned": config("e2vpt", {"kv_length": 5, "pruned_tokens": [0, 1, 2, 3, 4],
                                                 "pruned_pieces": [list(range(8))] * 10},
                                       {"prompts": 23040, "kv_prompts": 46080}, 4.2, 1.25 * 2 ** 30)}}
    text = report.family_cost_table(data)
    assert "10 interleaved rounds" in text and "`python benchmarks/cost.py --family --rounds 10`" in text
    assert "| vpt-deep | defaults | 92,160 | prompts 92,160 | 4.000 | 1.000 | 2.000 | 1.000 | 1024 | 1.000 |" in text
    assert ("| e2vpt-pruned | kv_length 5, pruned_tokens 0..4, pruned_pieces 10 x (0..7) | 69,120 | prompts 23,040 + "
            "kv_prompts 46,080 | 4.200 | 1.050 | 2.100 | 1.050 | 1280 | 1.250 |") in text
    assert report.compact([0, 2, 5]) == "[0, 2, 5]" and report.compact([[1], [2]]) == "[[1], [2]]"
