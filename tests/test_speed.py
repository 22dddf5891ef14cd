"""precision/channels_last ``auto``: chosen by timing the candidates, cached, and applied to the run."""
import json

import pytest
import torch

from base import metrics as M
from base.errors import ConfigError
from conftest import tiny_values
from trainable.akd import AKDRun
from trainable.checkpoint import load_checkpoint, save_checkpoint
from trainable.config import build_config, parse_value
from trainable.measure import choose_speed, time_candidates
from trainable.models import build_classifier
from trainable.speed import BF16_MARGIN, Speed, candidates, cpu_bf16_native, pick

CPU = torch.device("cpu")


def teacher():
    torch.manual_seed(0)
    return build_classifier("cnn", 10, 1, 8).eval()


class FakeTimer:
    """Seconds per iteration as given; counts its calls."""

    def __init__(self, seconds):
        self.seconds, self.calls = seconds, 0

    def __call__(self, cfg, teacher, data, device, pairs, data_root=None):
        self.calls += 1
        from trainable.speed import variant_name

        return {variant_name(p, cl): self.seconds[variant_name(p, cl)] for p, cl in pairs}


EMULATED = {"fp32": 0.10, "fp32 channels_last": 0.11, "bf16": 0.21, "bf16 channels_last": 0.20}  # bf16 at half speed
NATIVE = {"fp32": 0.10, "fp32 channels_last": 0.09, "bf16": 0.07, "bf16 channels_last": 0.06}


def test_auto_picks_fp32_where_bf16_is_slower(tmp_path, digits_data):
    timer = FakeTimer(EMULATED)
    speed = choose_speed(build_config(tiny_values()), teacher(), digits_data, CPU, cache=tmp_path / "s.json", timer=timer)
    assert (speed.precision, speed.channels_last, speed.source) == ("fp32", False, "measured")
    assert timer.calls == 1 and speed.speedup == pytest.approx(1.0)


def test_auto_picks_bf16_where_it_is_clearly_faster(tmp_path, digits_data):
    speed = choose_speed(build_config(tiny_values()), teacher(), digits_data, CPU, cache=tmp_path / "s.json",
                         timer=FakeTimer(NATIVE))
    assert (speed.precision, speed.channels_last) == ("bf16", True)
    assert speed.speedup == pytest.approx(0.10 / 0.06)
    assert "bf16 channels_last" in speed.describe() and "x1.67 against fp32" in speed.describe()


def test_bf16_barely_faster_than_fp32_is_not_worth_its_rounding():
    close = {"fp32": 0.100, "fp32 channels_last": 0.105, "bf16": 0.100 / BF16_MARGIN * 1.02, "bf16 channels_last": 0.2}
    assert pick(close) == ("fp32", False)
    clear = dict(close, bf16=0.100 / BF16_MARGIN * 0.98)
    assert pick(clear) == ("bf16", False)


def test_the_cached_choice_is_reused_without_measuring_again(tmp_path, digits_data):
    cache = tmp_path / "s.json"
    cfg = build_config(tiny_values())
    first = choose_speed(cfg, teacher(), digits_data, CPU, cache=cache, timer=FakeTimer(NATIVE))
    again = FakeTimer(EMULATED)  # would choose differently, were it asked
    second = choose_speed(cfg, teacher(), digits_data, CPU, cache=cache, timer=again)
    assert again.calls == 0
    assert (second.precision, second.channels_last, second.source) == (first.precision, first.channels_last, "cached")
    assert second.seconds == first.seconds
    # Other models (a wider student) are another combination: measured once more.
    other = choose_speed(build_config(tiny_values(student_width=0.5)), teacher(), digits_data, CPU, cache=cache,
                         timer=again)
    assert again.calls == 1 and other.precision == "fp32"
    assert len(json.loads(cache.read_text())) == 2


def test_a_damaged_cache_is_measured_again_not_a_crash(tmp_path, digits_data):
    cache = tmp_path / "s.json"
    for text in ("{", "[1, 2]", json.dumps({"x": 1})):
        cache.write_text(text)
        timer = FakeTimer(EMULATED)
        speed = choose_speed(build_config(tiny_values()), teacher(), digits_data, CPU, cache=cache, timer=timer)
        assert timer.calls == 1 and speed.precision == "fp32"
    assert isinstance(json.loads(cache.read_text()), dict)


def test_settings_named_in_the_config_are_not_measured(tmp_path, digits_data):
    timer = FakeTimer(NATIVE)
    speed = choose_speed(build_config(tiny_values(precision="fp32", channels_last=True)), teacher(), digits_data, CPU,
                         cache=tmp_path / "s.json", timer=timer)
    assert timer.calls == 0 and (speed.precision, speed.channels_last, speed.source) == ("fp32", True, "fixed")
    # One named, one auto: only the other is measured.
    assert candidates(build_config(tiny_values(precision="bf16")), CPU) == [("bf16", False), ("bf16", True)]
    assert candidates(build_config(tiny_values(channels_last=False)), CPU) == [("fp32", False), ("bf16", False)]


def test_channels_last_takes_true_false_or_auto():
    assert build_config(tiny_values()).channels_last == "auto"
    assert build_config(tiny_values(channels_last=True)).channels_last is True
    assert parse_value("channels_last", "auto") == "auto" and parse_value("channels_last", "false") is False
    with pytest.raises(ConfigError, match="channels_last: expected true, false or auto"):
        build_config(tiny_values(channels_last="sometimes"))


def test_the_run_computes_in_the_chosen_precision_and_layout(digits_data):
    cfg = build_config(tiny_values())
    plain = AKDRun(cfg, teacher(), digits_data, CPU)  # auto, nothing measured: fp32, contiguous
    assert (plain.precision, plain.channels_last, plain.speed.source) == ("fp32", False, "default")
    chosen = Speed("bf16", True, "measured", dict(NATIVE))
    run = AKDRun(cfg, teacher(), digits_data, CPU, speed=chosen)
    assert (run.precision, run.channels_last) == ("bf16", True)
    convs = [p for p in run.student.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    fake, _ = run.generate()
    with run._autocast():
        assert run.student(fake).dtype == torch.bfloat16
    # The config's own value wins over a measured choice.
    fixed = AKDRun(build_config(tiny_values(precision="fp32")), teacher(), digits_data, CPU, speed=chosen)
    assert (fixed.precision, fixed.channels_last) == ("fp32", True)


def test_the_checkpoint_records_the_speed_and_a_resume_may_change_it(tmp_path, digits_data):
    cfg = build_config(tiny_values(epochs=1))
    run = AKDRun(cfg, teacher(), digits_data, CPU, speed=Speed("bf16", True, "measured", dict(NATIVE)))
    run.fit()
    save_checkpoint(run, tmp_path / "c.pt")
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["speed"]["precision"] == "bf16" and ckpt["speed"]["channels_last"] is True
    assert Speed.from_record(ckpt["speed"]).speedup == pytest.approx(0.10 / 0.06)
    # Moved to a machine where fp32 is faster: the run resumes there in fp32.
    other = AKDRun(build_config(tiny_values(epochs=2)), teacher(), digits_data, CPU, speed=Speed("fp32", False))
    other.load_state_dict(ckpt)
    assert other.epoch == 1 and other.precision == "fp32"
    assert other.fit()[-1][M.EPOCH] == 2


def test_time_candidates_times_every_candidate_on_real_runs(digits_data):
    cfg = build_config(tiny_values())
    t = teacher()
    before = {k: v.clone() for k, v in t.state_dict().items()}
    seconds = time_candidates(cfg, t, digits_data, CPU, candidates(cfg, CPU), rounds=1, min_seconds=0.01, max_iters=2)
    assert set(seconds) == {"fp32", "fp32 channels_last", "bf16", "bf16 channels_last"}
    assert all(s > 0 for s in seconds.values())
    # Each candidate ran on its own copy: the caller's teacher is untouched (layout, mode, weights).
    assert all(torch.equal(before[k], v) for k, v in t.state_dict().items())
    assert all(p.is_contiguous() for p in t.parameters())


def test_cpu_flags_are_read_where_linux_gives_them(monkeypatch):
    assert cpu_bf16_native() in (True, False, None)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")  # oneDNN capped below bf16: emulated
    assert cpu_bf16_native() in (False, None)


def test_the_report_header_says_what_the_trials_computed_in():
    from results.report import speed_line

    rec = Speed("bf16", True, "measured", dict(NATIVE), "cpu Some CPU, native bf16: yes, 1 thread, torch 2").record()
    assert speed_line(rec) == "bf16 channels_last (measured, x1.67 against fp32) on cpu Some CPU, native bf16: yes, " \
                              "1 thread, torch 2"
    assert speed_line(None).startswith("not recorded")


class _Clock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def _fake_runs(clock, seconds, counts):
    """Runs whose iteration takes ``seconds[variant]`` on ``clock``; ``counts`` records the iterations of each."""
    from trainable.speed import variant_name

    class Run:
        def __init__(self, cfg, teacher):
            self.name = variant_name(cfg.precision, cfg.channels_last)
            counts[self.name] = 0

        def iteration(self):
            counts[self.name] += 1
            clock.now += seconds[self.name]

    return Run


def test_the_speed_measurement_drops_a_candidate_twice_as_slow_and_is_bounded(monkeypatch, digits_data):
    """One timed iteration each; bf16 emulated 20x slower than fp32 is not timed on; the rounds stop at the bound;
    the choice is what timing them all would give, and one line says what is measured before it starts."""
    import trainable.measure as S

    clock, counts, lines = _Clock(), {}, []
    monkeypatch.setattr(S, "time", clock)
    seconds = {"fp32": 0.10, "fp32 channels_last": 0.08, "bf16": 2.0, "bf16 channels_last": 1.9}
    pairs = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]
    got = time_candidates(build_config(tiny_values()), teacher(), digits_data, CPU, pairs,
                          make_run=_fake_runs(clock, seconds, counts), log=lines.append)
    assert counts["bf16"] == counts["bf16 channels_last"] == 2  # the warm-up and the one timed iteration
    assert counts["fp32"] > 2 and counts["fp32 channels_last"] > 2  # timed in rounds
    assert got == pytest.approx(seconds) and pick(got) == ("fp32", True)
    assert len(lines) == 1 and lines[0].startswith("measuring precision and layout: fp32, fp32 channels_last, bf16")
    # A slow model: each round is bounded by the time gone, not by a count of iterations.
    slow = {k: v * 300 for k, v in seconds.items()}  # 24-30 s an fp32 iteration
    clock.now, counts = 0.0, {}
    got = time_candidates(build_config(tiny_values()), teacher(), digits_data, CPU, pairs,
                          make_run=_fake_runs(clock, slow, counts), log=None)
    assert counts["fp32"] == counts["fp32 channels_last"] == 3  # warm-up, timed once, one round: past the bound
    assert pick(got) == ("fp32", True)
