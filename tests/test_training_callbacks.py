"""RoutingStatsCallback on a real transformers Trainer with a tiny OLMoE, checked against
collect_stats over replayed batches, known quantities and SSR's own coin stream."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

import hf_moe_patch as hmp
from hf_moe_patch.testing import tiny_model
from hf_moe_patch.training import callbacks as cbmod
from hf_moe_patch.training.callbacks import RoutingStatsCallback, add_routing_stats

NUM_LAYERS = 2  # tiny OLMoE
KEYS = [
    "routing/maxvio_top1", "routing/maxvio", "routing/experts_per_token", "routing/cv", "routing/router_entropy",
    "routing/tokens_without_expert_frac", "routing/sinkhorn_steps", "routing/sinkhorn_step_fraction", "routing/tokens",
]


class TokenData(torch.utils.data.Dataset):
    """Random token ids (vocab 128) with labels; with ``pad``, every third row right-padded."""

    def __init__(self, n: int = 96, seq_len: int = 16, pad: bool = False, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 128, (n, seq_len), generator=gen)
        self.mask = torch.ones(n, seq_len, dtype=torch.long)
        if pad:
            for i in range(0, n, 3):
                start = 4 + i % (seq_len - 4)
                self.ids[i, start:] = 0
                self.mask[i, start:] = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


class Recorder(TrainerCallback):
    """Keeps a copy of every ``logs`` dict it is given."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def train(model, tmp_path, *, steps=6, batch_size=2, accumulation=1, logging_steps=2, lr=0.0, data=None,
          attach=True, eval_steps=None, callbacks=(), **cb_kwargs):
    """Train ``model`` with the callback; returns (trainer, callback, the micro-batches in order)."""
    seen: list[dict] = []

    def collate(features):
        out = default_data_collator(features)
        seen.append({k: v.clone() for k, v in out.items()})
        return out

    data = data if data is not None else TokenData()
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=4, gradient_accumulation_steps=accumulation, logging_steps=logging_steps,
        learning_rate=lr, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
        eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps, dataloader_num_workers=0,
    )
    cb = RoutingStatsCallback(**cb_kwargs)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=TokenData(8, seed=1) if eval_steps else None,
                      data_collator=collate, callbacks=[cb, *callbacks])
    if attach:
        add_routing_stats(trainer, cb)
    trainer.train()
    return trainer, cb, seen


def routing_logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if any(k.startswith("routing/") for k in h)]


def ssr_coins(seed: int, p: float, n: int) -> list[bool]:
    """SSR's coin stream with a seed: its own generator, seeded ``seed``, one draw per forward."""
    gen = torch.Generator().manual_seed(seed)
    return [bool(torch.rand(1, generator=gen) < p) for _ in range(n)]


@pytest.fixture(scope="module")
def usmoe_run(tmp_path_factory):
    """usmoe (fractional budget) on padded data, lr=0 so that every window can be replayed."""
    tmp = tmp_path_factory.mktemp("usmoe")
    model = hmp.patch(tiny_model("olmoe"), "usmoe", top_k=1.5)
    trainer, cb, seen = train(model, tmp, data=TokenData(pad=True), jsonl_path=tmp / "stats.jsonl",
                              plot_path=tmp / "plots" / "balance.png")
    return trainer, cb, seen, tmp


def test_windows_equal_collect_stats_over_the_same_training_forwards(usmoe_run):
    trainer, cb, seen, _ = usmoe_run
    logs = routing_logs(trainer)
    assert [h["step"] for h in logs] == [2, 4, 6]
    assert all("loss" in h for h in logs)  # the periodic training logs; the summary log gets none (no leftover)
    model = trainer.model
    model.train()
    for i, h in enumerate(logs):
        window = seen[2 * i : 2 * i + 2]  # logging_steps=2, one micro-batch per step
        with torch.no_grad(), hmp.collect_stats(model) as stats:
            for b in window:
                model(**b)
        expected = stats.summary()
        assert h["routing/tokens"] == sum(int(b["attention_mask"].sum()) for b in window)  # padding skipped
        for key, name in [("maxvio_top1", "maxvio_top1"), ("maxvio", "maxvio"), ("cv", "cv"),
                          ("experts_per_token_mean", "experts_per_token"), ("router_entropy", "router_entropy"),
                          ("tokens_without_expert_frac", "tokens_without_expert_frac")]:
            assert h[f"routing/{name}"] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), name
        assert h["routing/sinkhorn_steps"] == 0 and h["routing/sinkhorn_step_fraction"] == 0.0
        assert "routing/sinkhorn_iterations_mean" not in h  # None is left out of the logs
        assert h["routing/experts_per_token"] == pytest.approx(1.5, abs=0.1)
    model.eval()


def test_jsonl_lines_match_log_history_and_plot_is_a_png(usmoe_run):
    trainer, cb, _, tmp = usmoe_run
    lines = [json.loads(line) for line in (tmp / "stats.jsonl").read_text().splitlines()]
    logs = routing_logs(trainer)
    assert len(lines) == len(logs) == len(cb.history) == 3
    for line, h in zip(lines, logs):
        assert line["step"] == h["step"] and line["epoch"] == h["epoch"] and line["window_steps"] == 2
        assert line["method"] == "usmoe"
        for key, value in line.items():
            if key.startswith("routing/") and value is not None:
                assert h[key] == value, key
        assert line["routing/sinkhorn_iterations_mean"] is None
        assert set(KEYS) <= set(line)
        layers = line["layers"]
        assert layers["layer"] == [0, 1] and len(layers["maxvio"]) == len(layers["maxvio_top1"]) == NUM_LAYERS
        assert sum(layers["maxvio"]) / NUM_LAYERS == pytest.approx(h["routing/maxvio"])
    png = tmp / "plots" / "balance.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reporters_receive_the_keys_only_when_the_callback_comes_first(tmp_path, monkeypatch):
    # Put a recorder exactly where report_to's integrations (TensorBoard, W&B, ...) go.
    import transformers.trainer as trainer_module

    reporters: list[Recorder] = []

    def integrations(report_to):
        reporters.append(Recorder())
        return [reporters[-1]]

    monkeypatch.setattr(trainer_module, "get_reporting_integration_callbacks", integrations)
    after = Recorder()  # a user callback given after ours
    trainer, _, _ = train(tiny_model("olmoe"), tmp_path, steps=4, callbacks=[after])
    reporter = reporters[-1]
    assert trainer.callback_handler.callbacks.index(reporter) > 0  # ours moved before it
    train_logs = [log for log in reporter.logs if "loss" in log]
    assert len(train_logs) == 2 and all(set(KEYS) <= set(log) for log in train_logs)
    assert train_logs[0]["routing/experts_per_token"] == 2.0  # native top-2
    assert [log for log in after.logs if "loss" in log] == train_logs

    # Without add_routing_stats the callback runs after the reporters: log_history has the keys,
    # the reporter does not.
    trainer, _, _ = train(tiny_model("olmoe"), tmp_path, steps=4, attach=False)
    reporter = reporters[-1]
    assert len(routing_logs(trainer)) == 2
    assert [log for log in reporter.logs if "loss" in log] and not any("routing/maxvio" in log for log in reporter.logs)


def test_evaluation_forwards_are_not_counted(tmp_path):
    # Evaluation at every step, in the middle of each logging window; lr=0, so the windows must
    # equal those of the same run without evaluation.
    with_eval, _, _ = train(tiny_model("olmoe"), tmp_path / "a", steps=4, eval_steps=1)
    plain, _, _ = train(tiny_model("olmoe"), tmp_path / "b", steps=4)
    assert sum("eval_loss" in h for h in with_eval.state.log_history) == 4
    assert not any("routing/maxvio" in h for h in with_eval.state.log_history if "eval_loss" in h)
    a, b = routing_logs(with_eval), routing_logs(plain)
    assert len(a) == len(b) == 2
    for ha, hb in zip(a, b):
        assert ha["routing/tokens"] == 2 * 2 * 16
        assert {k: v for k, v in ha.items() if k.startswith("routing/")} == {
            k: v for k, v in hb.items() if k.startswith("routing/")
        }


def test_gradient_accumulation_windows_count_every_micro_batch(tmp_path):
    trainer, cb, seen = train(tiny_model("olmoe"), tmp_path, steps=4, accumulation=3, logging_steps=2)
    logs = routing_logs(trainer)
    assert len(logs) == 2
    for i, h in enumerate(logs):
        # 2 steps x 3 micro-batches x 2 sequences x 16 tokens, each with exactly the native 2 experts
        assert h["routing/tokens"] == 2 * 3 * 2 * 16
        assert h["routing/experts_per_token"] == 2.0 and h["routing/tokens_without_expert_frac"] == 0.0
        assert cb.history[i]["window_steps"] == 2
        model = trainer.model
        model.train()
        with torch.no_grad(), hmp.collect_stats(model) as stats:
            for b in seen[6 * i : 6 * i + 6]:
                model(**b)
        model.eval()
        assert h["routing/maxvio"] == pytest.approx(stats.summary()["maxvio"])
        assert h["routing/maxvio_top1"] == pytest.approx(stats.summary()["maxvio_top1"])


@pytest.mark.parametrize("p", [1.0, 0.0])
def test_ssr_every_or_no_step_is_a_sinkhorn_step(tmp_path, p):
    model = hmp.patch(tiny_model("olmoe"), "ssr", p=p)
    trainer, cb, _ = train(model, tmp_path, steps=4, lr=1e-3, jsonl_path=tmp_path / "s.jsonl")
    logs = routing_logs(trainer)
    assert len(logs) == 2
    for h in logs:
        assert h["routing/sinkhorn_step_fraction"] == p
        assert h["routing/sinkhorn_steps"] == (2 * NUM_LAYERS if p == 1.0 else 0)  # router calls
        if p == 1.0:
            assert 1 <= h["routing/sinkhorn_iterations_mean"] <= 100
        else:
            assert "routing/sinkhorn_iterations_mean" not in h
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [line["routing/sinkhorn_iterations_mean"] is None for line in lines] == [p == 0.0] * 2


@pytest.mark.parametrize("accumulation", [1, 2])
def test_ssr_half_the_steps_follow_the_seeded_coins(tmp_path, accumulation):
    steps, seed = 40 // accumulation, 123
    model = hmp.patch(tiny_model("olmoe"), "ssr", p=0.5, seed=seed)
    trainer, cb, _ = train(model, tmp_path, steps=steps, accumulation=accumulation, batch_size=1,
                           logging_steps=10 // accumulation, lr=1e-3, plot_path=tmp_path / "ssr.png")
    coins = ssr_coins(seed, 0.5, steps * accumulation)  # one coin per forward
    step_flags = [any(coins[s * accumulation : (s + 1) * accumulation]) for s in range(steps)]
    logs = routing_logs(trainer)
    window = 10 // accumulation
    assert len(logs) == steps // window
    for i, h in enumerate(logs):
        flags = step_flags[i * window : (i + 1) * window]
        assert h["routing/sinkhorn_step_fraction"] == sum(flags) / window
        forwards = sum(coins[i * window * accumulation : (i + 1) * window * accumulation])
        assert h["routing/sinkhorn_steps"] == forwards * NUM_LAYERS
    total = sum(h["routing/sinkhorn_step_fraction"] * window for h in logs)
    if accumulation == 1:
        assert 10 <= total <= 30  # Binomial(40, 0.5): mean 20, sd 3.2
    else:
        assert 9 <= total <= 20  # each of 20 steps has 2 coins: P(any) = 0.75, mean 15, sd 1.9
    assert (tmp_path / "ssr.png").read_bytes()[:4] == b"\x89PNG"


def test_steps_after_the_last_periodic_log_go_to_the_summary_log(tmp_path):
    trainer, cb, _ = train(tiny_model("olmoe"), tmp_path, steps=5, logging_steps=2)
    logs = routing_logs(trainer)
    assert [h["step"] for h in logs] == [2, 4, 5]
    assert "train_runtime" in logs[-1] and logs[-1]["routing/tokens"] == 2 * 16
    assert [r["window_steps"] for r in cb.history] == [2, 2, 1]


def test_peft_wrapped_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("olmoe"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    hmp.patch(model, "ssr", p=1.0)
    trainer, _, _ = train(model, tmp_path, steps=2, lr=1e-3)
    (h,) = routing_logs(trainer)
    assert h["routing/sinkhorn_step_fraction"] == 1.0 and h["routing/tokens"] == 2 * 2 * 16
    assert h["routing/experts_per_token"] == 2.0


def test_gradient_checkpointing_keeps_the_ratios(tmp_path):
    plain, _, _ = train(tiny_model("olmoe"), tmp_path / "a", steps=2)
    model = tiny_model("olmoe")
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    ckpt, _, _ = train(model, tmp_path / "b", steps=2)
    (a,), (b,) = routing_logs(plain), routing_logs(ckpt)
    # The recomputation in backward calls the routers again (documented): counts double, the
    # ratios do not change.
    assert b["routing/tokens"] == 2 * a["routing/tokens"]
    for key in ["routing/maxvio", "routing/maxvio_top1", "routing/cv", "routing/experts_per_token", "routing/router_entropy"]:
        assert b[key] == pytest.approx(a[key], rel=1e-5), key


def test_counts_are_summed_over_processes(tmp_path, monkeypatch):
    # Two processes that saw the same micro-batches: every count doubles, every ratio stays.
    single, _, _ = train(hmp.patch(tiny_model("olmoe"), "ssr", p=0.5, seed=7), tmp_path / "a", steps=4)
    reduced: list[torch.Tensor] = []

    def fake_all_reduce(tensor, device):
        reduced.append(tensor)
        return tensor * 2

    monkeypatch.setattr(cbmod, "_world_size", lambda: 2)
    monkeypatch.setattr(cbmod, "_all_reduce_sum", fake_all_reduce)
    double, _, _ = train(hmp.patch(tiny_model("olmoe"), "ssr", p=0.5, seed=7), tmp_path / "b", steps=4)
    assert len(reduced) == 2 and all(t.dtype == torch.float64 for t in reduced)  # one all_reduce per log
    for a, b in zip(routing_logs(single), routing_logs(double), strict=True):
        assert b["routing/tokens"] == 2 * a["routing/tokens"]
        assert b["routing/sinkhorn_steps"] == 2 * a["routing/sinkhorn_steps"]
        for key in ["routing/maxvio", "routing/maxvio_top1", "routing/cv", "routing/experts_per_token",
                    "routing/router_entropy", "routing/sinkhorn_step_fraction"]:
            assert b[key] == pytest.approx(a[key]), key
        assert b.get("routing/sinkhorn_iterations_mean") == pytest.approx(a.get("routing/sinkhorn_iterations_mean"))


def test_jsonl_restarts_or_keeps_records_up_to_the_resumed_step(tmp_path):
    from transformers import TrainerControl, TrainerState

    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps({"step": s, "routing/maxvio": 0.1 * s}) + "\n" for s in (2, 4, 6)))
    cb = RoutingStatsCallback(jsonl_path=path)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True)
    cb.on_train_begin(args, TrainerState(global_step=4), TrainerControl())
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
    assert [r["step"] for r in cb.history] == [2, 4]
    cb.on_train_begin(args, TrainerState(global_step=0), TrainerControl())
    assert path.read_text() == "" and cb.history == []


def test_add_routing_stats_puts_one_callback_first_and_warns_when_it_is_not(tmp_path, caplog):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    cb = RoutingStatsCallback()
    trainer = Trainer(model=tiny_model("olmoe"), args=args, callbacks=[cb])
    assert add_routing_stats(trainer, cb) is cb
    assert trainer.callback_handler.callbacks[0] is cb
    assert sum(c is cb for c in trainer.callback_handler.callbacks) == 1
    built = add_routing_stats(trainer, prefix="moe/")
    assert trainer.callback_handler.callbacks[0] is built and built.prefix == "moe/"
    with pytest.raises(TypeError):
        add_routing_stats(trainer, cb, prefix="x/")
    from transformers import TrainerControl, TrainerState

    args.report_to = ["tensorboard"]
    with caplog.at_level(logging.WARNING, logger=cbmod.__name__):
        RoutingStatsCallback().on_train_begin(args, TrainerState(), TrainerControl())
    assert "add_routing_stats" in caplog.text
