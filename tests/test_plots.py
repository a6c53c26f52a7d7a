"""`kdstudent plot`: a run's PNGs, also for MoE students whose layers have different expert counts."""

import json

from student.plots import plot_run


def test_plots_of_a_moe_run_with_per_layer_expert_counts(tmp_path):
    records = []
    for step in (1, 2, 3):
        usage = {"0": [0.5, 0.5], "3": [0.25, 0.25, 0.25, 0.25]}  # layer_experts 0:2,3:4
        routing = {"0": {"effective_experts": 2.0, "effective_experts_per_token": 1.5},
                   "3": {"effective_experts": 4.0 - step / 3, "effective_experts_per_token": 1.9}}
        records.append(dict(step=step, loss=3.0 / step, kd=2.0 / step, ce=4.0, expert_usage=usage, routing=routing))
    records.append(dict(step=3, eval=dict(teacher_kl=1.0, ppl=9.0, top1_agree=0.5, ece=0.1)))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    written = plot_run(tmp_path)
    assert sorted(p.name for p in written) == ["eval.png", "experts.png", "loss.png"]
    assert all(p.stat().st_size > 1000 for p in written)
